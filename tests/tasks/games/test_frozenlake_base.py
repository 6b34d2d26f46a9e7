"""The game base (``builtin:games``): its scripted players, tokenizer, pretraining data, the shipped model against its
report, and the template writer that lets ``lightning-ctx extract`` run on it."""

from __future__ import annotations

import itertools
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from lightning_ctx.rollout_episodes import ChatFormat, PerTurnFormat
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import GameOutcome, make_games
from lightning_ctx.tasks.games.extract import format_games, writing_prompt
from lightning_ctx.tasks.games.frozenlake_base import evaluate as GE
from lightning_ctx.tasks.games.frozenlake_base import model as GM
from lightning_ctx.tasks.games.frozenlake_base import players as P
from lightning_ctx.tasks.games.frozenlake_base import pretrain as GP
from lightning_ctx.tasks.games.frozenlake_base import tokenizer as GT
from lightning_ctx.tasks.games.frozenlake_base.writer import TemplateWriter, template_notes
from lightning_ctx.tasks.games.task import PAPER_ENV_KWARGS, split_seeds

ENV = "FrozenLake-v0-raw"
KWARGS = PAPER_ENV_KWARGS[ENV]
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


@pytest.fixture(scope="module")
def boards():
    """OPCD's 19 FrozenLake boards (from the first training seeds)."""
    found = {}
    for seed in range(400):
        b = oracle.board(ENV, KWARGS, seed)
        found.setdefault(b.holes, b)
    assert len(found) == 19
    return list(found.values())


def _distances(board) -> dict:
    """Breadth-first distance to the goal around the holes, from every cell (an independent reference)."""
    dist, frontier = {board.goal: 0}, [board.goal]
    while frontier:
        nxt = []
        for r, c in frontier:
            for dr, dc in MOVES.values():
                cell = (r + dr, c + dc)
                if 0 <= cell[0] < 3 and 0 <= cell[1] < 3 and cell not in board.holes and cell not in dist:
                    dist[cell] = dist[(r, c)] + 1
                    nxt.append(cell)
        frontier = nxt
    return dist


# -- the scripted players --------------------------------------------------------------------------------------


def test_the_experienced_player_takes_a_shortest_safe_step_from_every_cell(boards):
    for board in boards:
        dist = _distances(board)
        for cell, d in dist.items():
            if cell == board.goal:
                continue
            dr, dc = MOVES[P.solver_move(board, cell)]
            step = (cell[0] + dr, cell[1] + dc)
            assert dist.get(step) == d - 1, (board.holes, cell)  # never a hole, always one step closer
        assert P.solver_move(board, board.start) == oracle.solve(board, 5)[0]
        assert P.win_probability(P.EXPERIENCED, board, 5) == 1.0


def test_the_naive_player_walks_toward_the_goal_and_ignores_the_holes(boards):
    board = next(b for b in boards if (1, 0) in b.holes)
    assert P.naive_moves(board, (0, 0)) == {"down": 0.5, "right": 0.5}  # down is a hole: ignored
    assert P.naive_moves(board, (2, 1)) == {"right": 1.0} and P.naive_moves(board, (0, 2)) == {"down": 1.0}
    # its exact win probability against brute force: every order of its four moves, weighted by its choices
    for b in boards:
        total = 0.0
        for order in set(itertools.permutations(["down", "down", "right", "right"])):
            cell, p, won = (0, 0), 1.0, False
            for move in order:
                p *= P.naive_moves(b, cell)[move]
                cell, end = b.step(cell, move)
                if end:
                    won = end == oracle.WON
                    break
            total += p * won
        assert P.win_probability(P.NAIVE, b, 5) == pytest.approx(total)
    assert 0.25 < P.mean_win_probability(P.NAIVE, boards, 5) < 0.4  # a clearly weaker player than the solver


def test_only_hole_notes_make_the_base_experienced():
    assert P.knows_holes(P.BUILTIN_EXPERIENCE) and P.player_for(P.BUILTIN_EXPERIENCE) == P.EXPERIENCED
    assert not P.knows_holes("\n".join(f"- {n}" for n in P.OTHER_NOTES))
    assert not P.knows_holes(None) and not P.knows_holes("")
    assert not P.knows_holes(P.HOLE_NOTES[0])  # a note is a "- " line
    assert P.knows_holes(f"Notes:\n- {P.OTHER_NOTES[1]}\n- {P.HOLE_NOTES[2]}")


def test_replies_carry_the_reasoning_and_the_move_last():
    board = oracle.FrozenLakeBoard(3, frozenset({(1, 1), (2, 0)}), (2, 2), (0, 0), 100)
    text = P.reply_text(P.EXPERIENCED, board, (1, 0), "up")
    assert text == "<think> at (1, 0) , holes (1, 1) (2, 0) </think> [up]"
    assert P.reply_text(P.NAIVE, board, (0, 1), "down", thinking=False) == "at (0, 1) , goal (2, 2) [down]"


# -- the tokenizer ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    if not (GM.GAMES_BASE_DIR / "model.safetensors").exists():
        pytest.fail(f"shipped game base missing in {GM.GAMES_BASE_DIR}")
    return GM.load_games_base()


def _real_prompts(tokenizer, n_games: int = 40, seed: int = 0):
    """Every per-turn prompt of games on held-out seeds played by a random player (walls and replies without an
    action included), in both histories, both thinking modes and under every experience; and the replies."""
    rng = random.Random(seed)
    replies = ["[up]", "[down]", "[left]", "[right]", "[w]", "[s]", "no move", "[a]", "[d]"]
    for history, thinking in itertools.product(("actions", "replies"), (None, False)):
        fmt = PerTurnFormat(ChatFormat(tokenizer, [tokenizer.eos_token_id], enable_thinking=thinking), history)
        for game in make_games(ENV, split_seeds(0, "val", n_games), 5, KWARGS):
            ep = SimpleNamespace(observation=game.reset(), history=[], context=None)
            fmt.start(ep)
            done = False
            while not done:
                for experience in GE.EXPERIENCES.values():
                    yield fmt.prompt_ids(ep.history, experience)
                reply = rng.choice(replies)
                ids = tokenizer(reply, add_special_tokens=False).input_ids
                done, feedback = game.step(reply)
                fmt.record(ep, SimpleNamespace(response=ids), game.actions[-1], None if done else feedback)


def test_the_tokenizer_covers_every_real_prompt_and_reply(shipped, boards):
    _, tok = shipped
    n = 0
    for ids in _real_prompts(tok):
        assert tok.unk_token_id not in ids, tok.decode(ids)
        n += 1
    assert n > 1000
    for board, player, thinking, move in itertools.product(boards[:3], P.PLAYERS, (True, False), MOVES):
        for cell in itertools.product(range(3), repeat=2):
            text = P.reply_text(player, board, cell, move, thinking)
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids and tok.decode(ids) == text  # decodes back exactly


def test_the_shipped_tokenizer_is_the_one_the_code_builds(shipped):
    _, tok = shipped
    fresh = GT.build_games_tokenizer()
    assert fresh.get_vocab() == tok.get_vocab() and tok.chat_template == fresh.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    (game,) = make_games(ENV, [3], 5, KWARGS)
    board = game.reset().split("Current Board:\n\n")[1].split("\n\nAvailable")[0]
    lines = board.split("\n")
    assert len(lines) == 7 and tok.tokenize(f"Current Board:\n\n{board}\n\nAvailable") == [
        "Current", "Board:", *lines, "Available"]  # a row is one token, and so is the line between rows
    assert set(GT.ROW_TEXTS) <= set(tok.get_vocab()) and len(GT.ROW_TEXTS) == 4 ** 3
    # the portable folder (transformers 4.56 and 5.x read it alike), as `pretrain-games` writes it
    assert json.loads((GM.GAMES_BASE_DIR / "tokenizer_config.json").read_text()) == GT.PORTABLE_TOKENIZER_CONFIG
    assert not {"backend", "extra_special_tokens"} & set(GT.PORTABLE_TOKENIZER_CONFIG)  # transformers-5-only keys
    for text in GT.board_texts():  # every board the game can show: OPCD's 19, the player on each of its 6 cells
        assert tok.unk_token_id not in tok(f"Current Board:\n\n{text}\n\nAvailable").input_ids
    assert len(GT.board_texts()) == 19 * 6
    off = tok.apply_chat_template([{"role": "user", "content": "Your move"}], add_generation_prompt=True,
                                  tokenize=False, enable_thinking=False)
    assert tok.tokenize(off)[-4:] == ["<|im_start|>", "assistant", "<think>", "</think>"]


# -- pretraining data ------------------------------------------------------------------------------------------


def test_cached_texts_equal_games_played_move_by_move():
    texts = GP.RealTexts()
    rng = random.Random(3)
    for seed in range(12):
        moves = [rng.choice(["[up]", "[down]", "[left]", "[right]", "no move"]) for _ in range(4)]
        for k in range(len(moves) + 1):
            history, cell, over = texts.history(seed, moves[:k])
            (game,) = make_games(ENV, [seed], 10, KWARGS)
            real = [game.reset()]
            done = False
            for move in moves[:k]:
                done, feedback = game.step(move)
                real.append(f"Your move: {game.actions[-1]}")
                if done:
                    break
                real.append(feedback)
            assert history == real and over == done
            if not done:
                assert tuple(game.env.state.game_state["player_pos"]) == cell


def test_pretraining_batches_are_seeded_real_turns_with_the_right_player(shipped):
    _, tok = shipped
    data = GP.GameTurns(tok, batch_size=4, seed=0)
    b1, b2 = next(iter(data)), next(iter(GP.GameTurns(tok, batch_size=4, seed=0)))
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert not torch.equal(b1["input_ids"], next(iter(GP.GameTurns(tok, batch_size=4, seed=1)))["input_ids"])
    assert torch.equal(b1["labels"] != -100, b1["attention_mask"] == 1)  # every real token is in the loss
    rng = random.Random(0)
    players = set()
    for _ in range(60):
        prompt, reply, info = data.example(rng)
        board = data.texts.board(info["seed"])
        text = tok.decode(reply, skip_special_tokens=True)
        assert reply[-1] == tok.eos_token_id and tok.unk_token_id not in prompt
        assert text.endswith(f"[{info['move']}]") and info["seed"] in split_seeds(0, "train", 512)
        cell = tuple(int(x) for x in text.split("at (")[1].split(")")[0].split(", "))
        if info["player"] == P.EXPERIENCED:
            assert info["move"] == P.solver_move(board, cell) and "holes" in text
        else:
            assert info["move"] in P.naive_moves(board, cell) and "goal" in text
        players.add((info["player"], info["thinking"]))
    assert len(players) == 4


# -- the shipped base ------------------------------------------------------------------------------------------


def test_the_shipped_base_and_its_report(shipped):
    model, tok = shipped
    files = {p.name for p in GM.GAMES_BASE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "report.json"} <= files
    assert sum(p.stat().st_size for p in GM.GAMES_BASE_DIR.iterdir()) < 5e6
    assert model.config.model_type == "qwen3" and model.dtype == torch.float32
    report = json.loads((GM.GAMES_BASE_DIR / "report.json").read_text())
    assert report["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    ev = report["eval"]
    assert ev["n_games"] >= 128 and ev["experiences"] == GE.EXPERIENCES
    sampled = ev["sampled"]["thinking"]
    assert sampled["builtin"] >= 0.9 and sampled["none"] <= 0.5  # the experience matters (issue numbers)
    assert ev["scripted"]["solver"] == 1.0 and ev["scripted"]["naive"] < 0.5


def test_the_shipped_base_plays_as_its_report_says_on_a_few_heldout_games(shipped):
    """32 held-out games, sampled as the evaluation samples: each pass rate within 3 binomial standard deviations of
    the report's (measured on 128 games)."""
    model, tok = shipped
    report = json.loads((GM.GAMES_BASE_DIR / "report.json").read_text())["eval"]["sampled"]["thinking"]
    n = 32
    rates = GE.pass_rates(model, tok, GE.heldout_seeds(n), seed=1, experiences={
        k: GE.EXPERIENCES[k] for k in ("builtin", "none")})
    for name, value in rates.items():
        p = report[name]
        assert abs(value - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1 / n, (name, value, p)


# -- the template writer ---------------------------------------------------------------------------------------


def _episode(passed: bool, reason: str, invalid: bool = False):
    feedback = "You attempted an invalid move. Reason: ..." if invalid else "You moved down to position (1, 0)."
    transcript = [{"role": "user", "content": "Current Board: ..."}, {"role": "assistant", "content": "[down]"},
                  {"role": "user", "content": feedback}, {"role": "assistant", "content": "[right]"}]
    outcome = GameOutcome(1.0 if passed else 0.25, passed, reason, 2, int(invalid), "game")
    return SimpleNamespace(outcome=outcome, transcript=transcript, game=SimpleNamespace(seed=0))


def test_the_template_writer_notes_what_the_games_show_and_nothing_twice():
    hole = _episode(False, "You fell into a hole! Game over. You completed 50% of the journey to the goal.")
    won = _episode(True, "Congratulations! You reached the goal!", invalid=True)
    limit = _episode(False, "turn limit: 5 model turns")
    prompt = writing_prompt("accumulate", "FrozenLake", "", [hole, won, limit])
    assert format_games([hole, won, limit]) in prompt
    assert template_notes(prompt) == [P.HOLE_NOTES[0], P.OTHER_NOTES[0], P.OTHER_NOTES[2]]  # at most 3
    write = TemplateWriter()
    assert write(writing_prompt("accumulate", "FrozenLake", "", [won])) == \
        f"- {P.OTHER_NOTES[0]}\n- {P.OTHER_NOTES[1]}"
    known = f"- {P.HOLE_NOTES[0]}"
    assert write(writing_prompt("accumulate", "FrozenLake", known, [hole])) == ""  # already known
    assert write(writing_prompt("revise", "FrozenLake", known, [hole, limit])) == f"{known}\n- {P.OTHER_NOTES[2]}"
    assert P.knows_holes(write(writing_prompt("accumulate", "FrozenLake", "", [hole])))


def test_extract_on_the_game_base_with_the_template_writer(mlflow_uri, tmp_path, capsys):
    """``lightning-ctx extract`` end to end on ``builtin:games``: the base plays without notes, the template writer
    writes from its games, and the kept experience turns the base into the solver on the held-out games."""
    from mlflow.tracking import MlflowClient

    from lightning_ctx.cli import main

    out = tmp_path / "experience.txt"
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--model", "builtin:games", "--writer", "template", "--updates", "2", "--games", "4",
              "--val-games", "16", "--eval-every", "1", "--dtype", "float32", "--device", "cpu",
              "--out", str(out)])
    assert exit_.value.code == 0, capsys.readouterr().err
    experience = out.read_text()
    assert P.knows_holes(experience)
    (run,) = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("extract").experiment_id])
    history = {m.step: m.value for m in MlflowClient(mlflow_uri).get_metric_history(run.info.run_id,
                                                                                     "extract/val_pass")}
    assert history[0] <= 0.6 and run.data.metrics["extract/best_val_pass"] >= history[0] + 0.3
    assert run.data.params["writer"] == "template"


# -- the demo's table ------------------------------------------------------------------------------------------


def test_the_demo_table_is_read_back_from_mlflow(mlflow_uri):
    """Two runs logged by hand: the base row is the first run's step 0, each arm's row its last step, and the reply
    lengths are tokens per game over turns per game."""
    import mlflow

    from lightning_ctx.demo import format_table
    from lightning_ctx.demo_games import COLUMNS, demo_rows

    logged = {}
    mlflow.set_experiment("demo-table")
    for arm, final in (("opd", 0.8), ("anchored", 0.6)):
        with mlflow.start_run() as run:
            for step, pass_no_ctx in ((0, 0.35), (20, final)):
                mlflow.log_metrics({"eval/pass_no_ctx": pass_no_ctx, "eval/pass_ctx": 0.9, "eval/harm": 0.1,
                                    "eval/help": 0.8, "eval/turns_no_ctx": 4.0, "eval/turns_ctx": 5.0,
                                    "eval/len_no_ctx": 40.0 + step, "eval/len_ctx": 50.0,
                                    "eval/invalid_rate_no_ctx": 0.25, "eval/pass_oracle": 1.0,
                                    "eval/pass_random": 0.03}, step=step)
        logged[arm] = run.info.run_id
    rows = demo_rows(logged, seed=7)
    assert [(label, seed) for label, seed, _ in rows] == [("base", 7), ("OPD", 7), ("anchored", 7)]
    assert [m["pass_no_ctx"] for _, _, m in rows] == [0.35, 0.8, 0.6]
    base, opd = rows[0][2], rows[1][2]
    assert base["reply_no_ctx"] == 10.0 and opd["reply_no_ctx"] == 15.0 and opd["reply_ctx"] == 10.0
    assert opd["invalid_no_ctx"] == 0.25 and opd["pass_oracle"] == 1.0 and opd["pass_random"] == 0.03
    table = format_table(rows, COLUMNS, width=14)
    assert table.splitlines()[3].split() == ["OPD", "7", "0.800", "0.900", "0.100", "0.800", "4.000", "0.250",
                                             "15.000", "10.000", "1.000", "0.030"]


@pytest.mark.slow
def test_demo_games_opd_raises_pass_no_ctx_and_prints_what_mlflow_holds(mlflow_uri, capsys):
    """A short `make demo-games` (plain OPD only, 10 steps at lr 3e-4 on the shipped game base; measured: 0.39 ->
    0.81): the printed table is the one MLflow holds (step 0 of the run for the base, its last evaluation for OPD),
    and OPD raised the pass rate without the experience on the 64 held-out games well beyond their noise (binomial
    sd of the difference ~0.08)."""
    from mlflow.tracking import MlflowClient

    from lightning_ctx import demo_games

    assert demo_games.main(["--arms", "opd", "--steps", "10", "--lr", "3e-4", "--experiment", "demo-games-test"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo-games-test").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/pass_no_ctx")}
    assert sorted(history) == [0, 10]
    printed = {line.split()[0]: [float(x) for x in line.split()[2:]] for line in out.splitlines()
               if line.split()[:1] in (["base"], ["OPD"])}
    column = demo_games.COLUMNS.index("pass_no_ctx")
    assert printed["base"][column] == pytest.approx(history[0], abs=5e-4)
    assert printed["OPD"][column] == pytest.approx(history[10], abs=5e-4)
    harm = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/harm")}
    assert printed["OPD"][demo_games.COLUMNS.index("harm")] == pytest.approx(harm[10], abs=5e-4)
    assert history[10] >= history[0] + 0.25, history
    assert any(a.path.startswith("pass_rates") for a in client.list_artifacts(run.info.run_id))
