"""Episode-level metrics counted by hand, and the two passes over the same seeds with a scripted player."""

import math

import pytest

from lightning_ctx.models.loading import load_tokenizer
from lightning_ctx.rollout_episodes import ChatFormat, build_format
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.env import NO_ACTION, GameFactory
from lightning_ctx.tasks.games.evaluate import GameSummary, evaluate_games, game_metrics, reference_rates
from lightning_ctx.tasks.games.metrics import GAMES
from tests.tasks.games.players import LiveGames, scripted_sampler, state_plan


def test_metrics_by_hand():
    # four games: (won without, won with) = (T, T), (T, F), (F, T), (F, F)
    no_ctx = GameSummary([True, True, False, False], [1.0, 1.0, 0.5, 0.0], [2, 3, 5, 1], [0, 0, 1, 2], [8, 12, 20, 4])
    ctx = GameSummary([True, False, True, False], [1.0, 0.2, 1.0, 0.0], [2, 1, 4, 1], [0, 0, 0, 1], [8, 4, 16, 8])
    m = game_metrics(no_ctx, ctx)
    assert m["pass_no_ctx"] == 0.5 and m["pass_ctx"] == 0.5 and m["both_pass"] == 0.25
    assert m["harm"] == 0.5 and m["help"] == 0.5  # 1 of 2 won without is lost with; 1 of 2 lost without is won with
    assert m["turns_no_ctx"] == 11 / 4 and m["invalid_rate_no_ctx"] == 3 / 11 and m["invalid_rate_ctx"] == 1 / 8
    assert m["reward_ctx"] == pytest.approx(2.2 / 4) and m["len_inflation"] == pytest.approx(36 / 44 - 1)
    none_won = game_metrics(GameSummary([False], [0.0], [1], [0], [3]), GameSummary([True], [1.0], [1], [0], [3]))
    assert math.isnan(none_won["harm"]) and none_won["help"] == 1.0  # undefined ratios are NaN, never 0
    assert math.isnan(m["pass_oracle"]) and math.isnan(m["pass_random"])  # no references given
    refs = game_metrics(no_ctx, ctx, {"pass_oracle": 0.75, "pass_random": 0.125})
    assert list(refs) == GAMES.names()[:16] and refs["pass_oracle"] == 0.75 and refs["pass_random"] == 0.125


def test_reference_rates_are_the_oracle_on_exactly_those_seeds():
    kwargs = {"num_boxes": 1, "dim_room": [6, 6]}
    seeds = [1_000_008, 1_000_010, 1_000_011, 1_000_012]  # val seeds 10 and 12 cannot be won within 5 moves
    rates = reference_rates(GameFactory("Sokoban-v0-raw", 5, kwargs), seeds)
    assert rates["pass_oracle"] == 0.5
    exact = [oracle.random_win_probability(oracle.board("Sokoban-v0-raw", kwargs, s), 5) for s in seeds]
    assert rates["pass_random"] == pytest.approx(sum(exact) / 4) and 0 < rates["pass_random"] < 0.5
    assert reference_rates(GameFactory("Sokoban-v0-raw", 30, kwargs), seeds)["pass_oracle"] == 1.0  # more turns
    unknown = reference_rates(lambda seeds: [], seeds)  # not a GameFactory: no references
    assert math.isnan(unknown["pass_oracle"]) and math.isnan(unknown["pass_random"])


@pytest.mark.parametrize("name", ["per_turn", "single_sequence"])
def test_same_seeds_with_and_without_the_experience(tiny_qwen3, monkeypatch, name):
    """The player wins only when the experience is in its prompt: pass_ctx 1, pass_no_ctx 0, help 1; the mechanistic
    metrics on the turns played without it."""
    tok = load_tokenizer(tiny_qwen3)
    live = LiveGames(monkeypatch)

    def respond(game, text):
        return f"I go [{state_plan(game)[0]}]" if "PLAN" in text else "no move at all"

    sampler = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id, respond, live=live)
    fmt = build_format(name, ChatFormat(tok, [tok.eos_token_id]))
    result = evaluate_games(sampler, fmt, GameFactory("FrozenLake-v0-raw", 8), [3, 5, 7], "Experience: PLAN",
                            tok.pad_token_id, batch_size=2)
    m = result.metrics
    assert m["pass_no_ctx"] == 0 and m["pass_ctx"] == 1 and m["help"] == 1 and math.isnan(m["harm"])
    # intervals over the three games: every resample gives the same pass rates; harm has no interval
    assert m["n_items"] == 3 and m["pass_ctx_lo"] == m["pass_ctx_hi"] == 1 and math.isnan(m["harm_lo"])
    assert m["invalid_rate_no_ctx"] == 1.0 and m["turns_no_ctx"] == 2 and m["invalid_rate_ctx"] == 0
    seeds = [g.seed for g in live.games]
    assert seeds == [3, 5, 7, 3, 5, 7]  # the same seeds both ways
    row = result.transcripts[0]
    assert row["seed"] == 3 and row["passed_ctx"] and not row["passed_no_ctx"]
    assert row["transcript_ctx"][0] == {"role": fmt.context_role, "content": "Experience: PLAN"}
    assert row["transcript_no_ctx"][0]["role"] == "user" and row["reason_no_ctx"].startswith("Invalid Move")
    assert row["actions_no_ctx"] == [NO_ACTION, NO_ACTION] and len(row["actions_ctx"]) == row["turns_ctx"]
    assert all(a in ("[up]", "[down]", "[left]", "[right]") for a in row["actions_ctx"])
    # the ceiling on these seeds (4x4 boards, 8 moves: every one winnable) and the random player's exact odds
    assert m["pass_oracle"] == 1.0 and m["pass_random"] == pytest.approx(
        sum(oracle.analyse("FrozenLake-v0-raw", {}, s, 8).random_pass for s in (3, 5, 7)) / 3)


def test_context_mechanics_by_hand(tiny_qwen3, monkeypatch):
    """``ctx_kl`` and ``hidden_cos`` on played turns = KL and cosines from unpadded forwards of each turn's prefix
    without and with the experience (per_turn rows); an identical context gives KL 0 and cosine 1."""
    import torch

    from lightning_ctx.models.loading import load_causal_lm
    from lightning_ctx.tasks.games.evaluate import context_mechanics, play_in_batches

    tok = load_tokenizer(tiny_qwen3)
    model = load_causal_lm(tiny_qwen3)
    live = LiveGames(monkeypatch)
    sampler = scripted_sampler(tok, tok.eos_token_id, tok.pad_token_id,
                               lambda g, t: f"I go [{state_plan(g)[0]}]" if g.seed == 3 else "no move", live=live)
    fmt = build_format("per_turn", ChatFormat(tok, [tok.eos_token_id]))
    episodes = play_in_batches(sampler, fmt, GameFactory("FrozenLake-v0-raw", 3), [3, 5], None, tok.pad_token_id,
                               "cpu", 2)
    m = context_mechanics(model, fmt, episodes, "Experience: PLAN", tok.pad_token_id, [1, 2], None, 1).compute()
    kl_sum = n = 0.0
    cos = {1: 0.0, 2: 0.0}
    with torch.no_grad():
        for ep in episodes:
            for t in ep.turns:
                ctx = fmt.prompt_ids(ep.history[:t.at], "Experience: PLAN")
                a = model(input_ids=torch.tensor([t.prefix + t.response]), output_hidden_states=True)
                b = model(input_ids=torch.tensor([ctx + t.response]), output_hidden_states=True)
                for j in range(len(t.response)):
                    la = torch.log_softmax(a.logits[0, len(t.prefix) - 1 + j].float(), -1)
                    lb = torch.log_softmax(b.logits[0, len(ctx) - 1 + j].float(), -1)
                    kl_sum += float((la.exp() * (la - lb)).sum())
                    for k in cos:
                        ha, hb = a.hidden_states[k][0, len(t.prefix) + j], b.hidden_states[k][0, len(ctx) + j]
                        cos[k] += float(torch.nn.functional.cosine_similarity(ha, hb, dim=0))
                    n += 1
    assert n == 3 * 4 + 2 * 3  # game 3: 3 turns "I go [move] <|im_end|>"; game 5: 2 invalid turns "no move <|im_end|>"
    assert m["ctx_kl"] == pytest.approx(kl_sum / n, rel=1e-4) and m["ctx_kl"] > 1e-4
    assert m["hidden_cos/layer_1"] == pytest.approx(cos[1] / n, rel=1e-4)
    assert m["hidden_cos/layer_2"] == pytest.approx(cos[2] / n, rel=1e-4)
    same = context_mechanics(model, fmt, episodes, "", tok.pad_token_id, [1, 2], None, 1).compute()
    assert same["ctx_kl"] == pytest.approx(0.0, abs=1e-6) and same["hidden_cos/mean"] == pytest.approx(1.0)
