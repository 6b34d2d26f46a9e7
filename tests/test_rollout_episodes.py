"""Multi-turn episodes in both formats: the loss mask on hand-checked episodes, what the student and the teacher
see, early ends (win, hole, invalid moves, turn limit, cut turns), thinking mode, the loss on them, and the
invariant of both formats: every scored token is scored under exactly the prefix it was sampled with."""

import pytest
import torch

from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import (
    ChatFormat,
    EpisodeBatch,
    PerTurnFormat,
    SingleSequenceFormat,
    play_episodes,
)
from lightning_ctx.tasks.games.env import make_games
from tests.tasks.games.players import LiveGames, scripted_sampler, state_plan

EXPERIENCE = "Experience: PLAN the plan"


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return load_tokenizer(tiny_qwen3)


def _chat(tok, **kw):
    return ChatFormat(tok, [tok.eos_token_id], **kw)


def _seq(tok, **kw):
    return SingleSequenceFormat(_chat(tok, **kw))


def _score(fmt, episodes, context=EXPERIENCE, pad=0):
    return fmt.score_inputs(episodes, [str(i) for i in range(len(episodes))], context, pad)


def _solver(game, text):
    return f"I go [{state_plan(game)[0]}]"


def _hole(game, text):
    st = game.env.state.game_state
    (r, c) = st["player_pos"]
    for name, (dr, dc) in {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}.items():
        if 0 <= r + dr < 4 and 0 <= c + dc < 4 and st["grid"][r + dr][c + dc] == "H":
            return f"[{name}]"
    raise AssertionError("no hole next to the player")


@pytest.fixture
def live(monkeypatch):
    return LiveGames(monkeypatch)


def _segments(tokens, mask):
    """Maximal runs of equal mask values: [(mask value, ids)]."""
    runs = []
    for t, m in zip(tokens, mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(t)
        else:
            runs.append((m, [t]))
    return runs


def test_mask_covers_exactly_the_students_turns(tok, live):
    fmt = _seq(tok)
    chat = fmt.chat
    sampler = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, _solver, live=live)
    games = make_games("FrozenLake-v0-raw", [3], max_turns=8)
    games[0].reset()
    plan = state_plan(games[0])
    (ep,) = play_episodes(sampler, fmt, games, pad_token_id=0)
    assert ep.outcome.passed and ep.outcome.turns == len(plan)
    runs = _segments(ep.tokens, ep.loss_mask)
    # student turn, template + feedback, student turn, ... , student turn (the last one: the game ended)
    assert [m for m, _ in runs] == [1, 0] * (len(plan) - 1) + [1]
    for k, (m, ids) in enumerate(runs):
        text = tok.decode(ids)
        if m == 1:  # the move and its end-of-turn token, nothing else
            assert text == f"I go [{plan[k // 2]}] <|im_end|>"
        else:  # the template's user turn with the environment's message, up to the next generation prompt
            assert text.startswith("<|im_start|> user You moved") and text.endswith("<|im_end|> <|im_start|> assistant")
    assert sum(ep.loss_mask) == len(plan) * 4  # I go [move] <|im_end|>
    # the sequence is exactly the chat template applied to the whole transcript (nothing lost, nothing doubled)
    messages = [{"role": m["role"], "content": m["content"]} for m in ep.transcript]
    assert ep.prompt_ids + ep.tokens == chat.encode(chat.render(messages, generation_prompt=False))
    assert [m["action"] for m in ep.transcript if m["role"] == "assistant"] == [f"[{m}]" for m in plan]


@pytest.mark.parametrize("per_turn", [False, True])
def test_student_never_sees_the_experience_and_the_teacher_always_does(tok, live, per_turn):
    calls = []
    sampler = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, _solver, calls, live=live)
    games = lambda seeds: make_games("FrozenLake-v0-raw", seeds, max_turns=3)  # noqa: E731
    fmt = PerTurnFormat(_chat(tok)) if per_turn else _seq(tok)
    batch = EpisodeBatch(["a", "b"], [3, 5], EXPERIENCE, games, fmt, tok.pad_token_id)
    pair, rollout = batch.play(sampler)
    assert len(calls) >= 2 and not any("PLAN" in c or "system" in c or "Experience" in c for c in calls)
    rows = rollout.response_ids.shape[0]
    assert rows == (6 if per_turn else 2)  # per_turn: one row per turn (3 each); else one per game
    for i in range(rows):
        plain = tok.decode(pair.prompt_ids[i][pair.prompt_mask[i].bool()])
        with_ctx = tok.decode(pair.ctx_prompt_ids[i][pair.ctx_prompt_mask[i].bool()])
        if per_turn:  # one user message; the experience block inserted is the only difference
            assert "system" not in with_ctx and "PLAN" not in plain
            block = _inserted(pair.prompt_ids[i][pair.prompt_mask[i].bool()].tolist(),
                              pair.ctx_prompt_ids[i][pair.ctx_prompt_mask[i].bool()].tolist())
            assert block is not None and EXPERIENCE in tok.decode(block)
        else:
            assert "system" not in plain and with_ctx.startswith(f"<|im_start|> system {EXPERIENCE} <|im_end|>")
            assert with_ctx.endswith(plain)  # same first turn after the system message
    assert pair.contexts == [EXPERIENCE] * rows


def test_early_ends_invalid_moves_and_cut_turns_batch_together(tok, live):
    """Four games in one batch ending at different turns: win, hole, two invalid moves, turn limit with a cut turn."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    scripts = {0: _solver,  # win (seed 3: 6 moves)
               1: _hole,  # hole at turn 1
               2: lambda g, t: "no move at all",  # invalid, warned, invalid again: ends at turn 2
               3: lambda g, t: ("I go [right] I go", False)}  # cut at max_new_tokens each time: turn limit 3
    fmt = _seq(tok)
    games = make_games("FrozenLake-v0-raw", [3, 3, 3, 3], max_turns=8)
    games[3].max_turns = 3
    # one sampler per batch row: rows are the games still running, in order
    running = [0, 1, 2, 3]

    def routed(ids, mask, settings=None):
        outs = [scripted_sampler(tok, eos, pad, lambda t, g=g: scripts[g](games[g], t))(ids[r:r + 1], mask[r:r + 1])
                for r, g in enumerate(running)]
        width = max(o.response_ids.shape[1] for o in outs)
        def cat(name):
            return torch.cat([torch.nn.functional.pad(getattr(o, name), (0, width - getattr(o, name).shape[1]),
                                                      value=pad if name == "response_ids" else 0) for o in outs])
        from lightning_ctx.rollout import Rollout

        return Rollout(ids, mask, cat("response_ids"), cat("response_mask").bool(),
                       torch.cat([o.lengths for o in outs]), torch.cat([o.finished for o in outs]))

    episodes = play_episodes(_tracking(routed, running, games), fmt, games, pad_token_id=pad)
    o = [e.outcome for e in episodes]
    assert o[0].passed and o[0].turns == 6 and o[0].ended_by == "game"
    assert not o[1].passed and o[1].turns == 1 and "hole" in o[1].reason
    assert o[2].turns == 2 and o[2].invalid_moves == 2 and o[2].reason.startswith("Invalid Move")
    assert o[3].ended_by == "turn_limit" and o[3].turns == 3 and o[3].invalid_moves == 0
    _, rollout = _score(fmt, episodes, pad=pad)
    assert rollout.lengths.tolist() == [sum(e.loss_mask) for e in episodes] == [24, 2, 5 * 2, 5 * 3]
    assert rollout.finished.tolist() == [True, True, True, False]
    for i, e in enumerate(episodes):  # padding: attended nowhere, never in the loss
        n = len(e.tokens)
        assert rollout.response_attention[i, :n].all() and not rollout.response_attention[i, n:].any()
        assert not rollout.response_mask[i, n:].any() and (rollout.response_ids[i, n:] == pad).all()
    # a cut turn is closed with the end-of-turn token as a template token (attended, not in the loss)
    cut = episodes[3]
    first_end = cut.tokens.index(tok.eos_token_id)
    assert first_end == 5 and cut.loss_mask[first_end] == 0 and cut.turns_finished == [False] * 3
    assert rollout.stats["episode_pass"] == 0.25 and rollout.stats["episode_turns"] == (6 + 1 + 2 + 3) / 4


def _inserted(plain: list[int], with_ctx: list[int]):
    """The block ``with_ctx`` has on top of ``plain`` when it is ``plain`` with one contiguous insertion, else None."""
    n = len(with_ctx) - len(plain)
    for a in range(len(plain) + 1):
        if with_ctx[:a] == plain[:a] and with_ctx[a + n:] == plain[a:]:
            return with_ctx[a:a + n]
    return None


def _tracking(sampler, running, games):
    """Keep ``running`` (the game index of each batch row) in step with the games still being played."""
    def sample(ids, mask, settings=None):
        running[:] = [g for g in range(len(games)) if not games[g].done]
        return sampler(ids, mask, settings)
    return sample


def test_thinking_flag_reaches_the_template_and_reasoning_can_be_dropped(tok, live):
    plain = _chat(tok).first_prompt_ids("hello")
    no_think = _chat(tok, enable_thinking=False).first_prompt_ids("hello")
    assert tok.decode(no_think) == tok.decode(plain) + " <think> </think>"

    def respond(game, text):  # the reasoning mentions [up]; only the answer after </think> is the move
        return f"<think> not [up] but {state_plan(game)[0]} </think> " + _solver(game, text)

    sampler = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, respond, live=live)
    for keep in (True, False):
        fmt = _seq(tok, enable_thinking=True, keep_reasoning=keep)
        (ep,) = play_episodes(sampler, fmt, make_games("FrozenLake-v0-raw", [3], max_turns=8), pad_token_id=0)
        assert ep.outcome.passed  # the env got the answer, not the [up] inside the reasoning
        text = tok.decode(ep.tokens)  # what later turns see
        assert text.count("<think>") == (ep.outcome.turns if keep else 0)
        # what is scored: every reply whole, reasoning included, either way
        _, rollout = _score(fmt, [ep])
        assert rollout.num_tokens == ep.student_tokens == ep.outcome.turns * (4 + 6)
        assert rollout.response_ids.shape[0] == (1 if keep else ep.outcome.turns)


def _recording(sampler, record):
    """``sampler``, recording every row it samples as (the unpadded ids it was sampled from, the sampled tokens)."""
    def sample(ids, mask, settings=None):
        out = sampler(ids, mask, settings)
        for r in range(ids.shape[0]):
            record.append((ids[r][mask[r].bool()].tolist(), out.response_ids[r][out.response_mask[r]].tolist()))
        return out
    return sample


FORMATS = [("single_sequence", True), ("single_sequence", False), ("per_turn", True), ("per_turn", False)]


@pytest.mark.parametrize("thinking", [False, True], ids=["plain", "thinking"])
@pytest.mark.parametrize("name,keep", FORMATS, ids=[f"{n}-keep_{k}" for n, k in FORMATS])
def test_every_scored_token_is_scored_under_exactly_the_prefix_it_was_sampled_with(tiny_qwen3, live, name, keep,
                                                                                    thinking):
    """Both formats, with and without thinking, keeping earlier reasoning or not: the scored tokens are exactly the
    sampled ones, each once, each after exactly the ids it was sampled from (the teacher's prefix: the same with the
    experience inserted); and the batched OPD and anchor terms equal token KLs from unpadded forwards of each row."""
    from lightning_ctx.module import OnPolicyDistillation
    from lightning_ctx.rollout_episodes import build_format
    from tests.helpers import perturb

    module = OnPolicyDistillation(student=tiny_qwen3, anchor_weight=0.5, rollout_warmup=False)
    perturb(module.student, seed=1)
    tok = module.tokenizer

    def respond(game, text):
        if game.seed != 3:
            return "no move at all"
        reply = _solver(game, text)
        return f"<think> not [up] but {state_plan(game)[0]} </think> {reply}" if thinking else reply

    record = []
    sampler = _recording(scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, respond, live=live), record)
    fmt = build_format(name, _chat(tok, enable_thinking=thinking, keep_reasoning=keep), "replies")
    games = lambda seeds: make_games("FrozenLake-v0-raw", seeds, max_turns=4)  # noqa: E731
    pair, rollout = EpisodeBatch(["a", "b"], [3, 5], EXPERIENCE, games, fmt, tok.pad_token_id).play(sampler)
    assert len(record) == 6  # game 3: 4 turns; game 5: 2 invalid moves

    attention = rollout.response_mask if rollout.response_attention is None else rollout.response_attention
    scored, rows = [], []
    for r in range(rollout.response_ids.shape[0]):
        prefix = pair.prompt_ids[r][pair.prompt_mask[r].bool()].tolist()
        ctx_prefix = pair.ctx_prompt_ids[r][pair.ctx_prompt_mask[r].bool()].tolist()
        block = rollout.response_ids[r][attention[r].bool()].tolist()
        positions = rollout.response_mask[r].nonzero().flatten().tolist()
        scored += [(tuple(prefix + block[:j]), block[j]) for j in positions]
        rows.append((prefix, ctx_prefix, block, positions))
        inserted = _inserted(prefix, ctx_prefix)  # the teacher's prefix: the student's with the experience added
        assert inserted is not None and EXPERIENCE in tok.decode(inserted)
    sampled = [(tuple(prefix + resp[:i]), resp[i]) for prefix, resp in record for i in range(len(resp))]
    assert sorted(scored) == sorted(sampled)

    terms = module.compute_losses(pair, rollout)

    def logp(model, ids):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    opd_sum = anchor_sum = 0.0
    with torch.no_grad():
        for prefix, ctx_prefix, block, positions in rows:
            s, t, q = (logp(module.student, prefix + block), logp(module.teacher, ctx_prefix + block),
                       logp(module.student, ctx_prefix + block))
            for j in positions:
                sj, tj, qj = s[len(prefix) - 1 + j], t[len(ctx_prefix) - 1 + j], q[len(ctx_prefix) - 1 + j]
                opd_sum += float((sj.exp() * (sj - tj)).sum())
                anchor_sum += float((sj.exp() * (sj - qj)).sum())
    n = len(sampled)
    assert n == 4 * (4 + 6 * thinking) + 2 * 5
    assert terms["opd"].item() == pytest.approx(opd_sum / n, rel=1e-4)
    assert terms["anchor"].item() == pytest.approx(anchor_sum / n, rel=1e-4)
    assert terms["opd"].item() > 1e-3  # not vacuous: the perturbed student differs from the teacher


def test_a_turn_stopped_by_another_eos_id_is_closed_with_the_templates_end_of_turn(tok, live):
    """Qwen3's generation config stops on <|im_end|> and on <|endoftext|>: a turn that ends with the second gets the
    template's <|im_end|> (a template token, not in the loss) before the next user turn."""
    second = tok.convert_tokens_to_ids("<|endoftext|>")
    assert second != tok.eos_token_id
    fmt = _seq(tok)
    sampler = scripted_sampler(tok, second, tok.pad_token_id, _solver, live=live)
    (ep,) = play_episodes(sampler, fmt, make_games("FrozenLake-v0-raw", [3], max_turns=3), pad_token_id=0)
    runs = _segments(ep.tokens, ep.loss_mask)
    assert [m for m, _ in runs] == [1, 0, 1, 0, 1, 0]
    for m, ids in runs:
        if m == 1:
            assert ids[-1] == second and tok.decode(ids).startswith("I go [")
        else:  # the template's end of turn first, then the user turn
            assert ids[0] == fmt.chat.end_of_turn == tok.eos_token_id


NEWLINE_CHATML = (  # ChatML with newlines (as real Qwen templates write it) and a thinking switch
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_feedback_turn_is_what_the_template_writes_after_the_end_of_turn_token(tok):
    """The user turn after a move starts right after the student's end-of-turn token (the template's newline
    included) and ends with the next generation prompt; templates that ignore enable_thinking are not sent it."""
    from lightning_ctx.errors import DataError
    from lightning_ctx.models.tiny import LLAMA3_TEMPLATE

    tok = load_tokenizer(tok.name_or_path)
    tok.chat_template = NEWLINE_CHATML
    plain, no_think = _chat(tok), _chat(tok, enable_thinking=False)
    assert plain.feedback_prefix == "\n<|im_start|>user\n"
    assert plain.feedback_suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert no_think.feedback_suffix.endswith("assistant\n<think>\n\n</think>\n\n")
    assert no_think.template_kwargs == {"enable_thinking": False}
    tok.chat_template = LLAMA3_TEMPLATE  # no enable_thinking in it: not passed; its end-of-turn token is not ours
    with pytest.raises(DataError, match="does not close an assistant turn"):
        _chat(tok, enable_thinking=False)
    from lightning_ctx.models.tiny import build_tiny_tokenizer

    llama = build_tiny_tokenizer("llama")
    with pytest.raises(DataError, match="keep_reasoning: false needs <think>"):
        ChatFormat(llama, [llama.eos_token_id], keep_reasoning=False)
    chat = ChatFormat(llama, [llama.eos_token_id], enable_thinking=False)
    assert chat.template_kwargs == {} and chat.feedback_prefix == " <|start_header_id|>user<|end_header_id|> "
    assert chat.feedback_suffix == "<|eot_id|> <|start_header_id|>assistant<|end_header_id|> "
