"""The games' metrics, registered once (:data:`GAMES`): per game, from the rows of the transcripts table.

An item is a game seed, played once without and once with the experience; ``pass`` is the removability
metrics' ``acc`` (the one definition, :func:`~lightning_ctx.eval.item_metrics.removability_items`), so harm and
help and their intervals over games mean what they mean on the other tasks. Definitions: the table of
:mod:`lightning_ctx.tasks.games.evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_ctx.eval.item_metrics import RatioOfSums, removability_items
from lightning_ctx.eval.registry import ItemRows, MetricRegistry, MetricSpec, column

__all__ = ["GAMES", "REFERENCE_KEYS", "game_items", "measure_games"]

#: Rates of the oracle on the evaluated seeds (not per game here: no interval).
REFERENCE_KEYS = ("pass_oracle", "pass_random")


def game_items(rows: Sequence[Mapping[str, Any]]) -> dict[str, RatioOfSums]:
    """Rows with ``passed_*``, ``reward_*``, ``turns_*``, ``invalid_moves_*`` and ``tokens_*`` of both passes
    (``no_ctx``, ``ctx``) -> the per-game metrics, in :data:`GAMES`' order."""
    rem = removability_items(column(rows, "passed_no_ctx"), column(rows, "passed_ctx"),
                             column(rows, "tokens_no_ctx"), column(rows, "tokens_ctx"))
    games = np.ones(len(rows))
    out = {"pass_no_ctx": rem["acc_no_ctx"], "pass_ctx": rem["acc_ctx"], "harm": rem["harm"], "help": rem["help"],
           "both_pass": rem["both_correct"]}
    for tag in ("no_ctx", "ctx"):
        out[f"reward_{tag}"] = RatioOfSums(column(rows, f"reward_{tag}"), games)
    turns = {tag: column(rows, f"turns_{tag}") for tag in ("no_ctx", "ctx")}
    out.update({f"turns_{tag}": RatioOfSums(t, games) for tag, t in turns.items()})
    out.update({f"invalid_rate_{tag}": RatioOfSums(column(rows, f"invalid_moves_{tag}"), t)
                for tag, t in turns.items()})
    out.update(len_no_ctx=rem["len_no_ctx"], len_ctx=rem["len_ctx"], len_inflation=rem["len_inflation"])
    return out


GAMES = MetricRegistry("games")
GAMES.add(
    MetricSpec("pass_no_ctx", summary=True, curve="fraction", compare=True,
               doc="fraction of games won (reward 1.0) without the experience"),
    MetricSpec("pass_ctx", summary=True, curve="fraction", compare=True, doc="the same with the experience"),
    MetricSpec("harm", -1, summary=True, curve="fraction", compare=True,
               doc="won without and lost with, over won without"),
    MetricSpec("help", summary=True, doc="lost without and won with, over lost without"),
    MetricSpec("both_pass", curve="fraction", doc="won both ways"),
    MetricSpec("reward_no_ctx", doc="mean raw TextArena reward without the experience"),
    MetricSpec("reward_ctx", doc="the same with it"),
    MetricSpec("turns_no_ctx", summary=True, doc="mean model turns per game without the experience"),
    MetricSpec("turns_ctx", doc="the same with it"),
    MetricSpec("invalid_rate_no_ctx", -1, summary=True, doc="invalid moves over model turns without the experience"),
    MetricSpec("invalid_rate_ctx", -1, doc="the same with it"),
    MetricSpec("len_no_ctx", curve="length", doc="mean student tokens per game without the experience"),
    MetricSpec("len_ctx", curve="length", doc="the same with it"),
    MetricSpec("len_inflation", 0, compare=True, doc="len_ctx / len_no_ctx - 1"),
    items=lambda rows: game_items(rows.examples))  # the transcripts table
GAMES.add(
    MetricSpec("pass_oracle", summary=True, doc="fraction of the same games an optimal player wins (the ceiling)"),
    MetricSpec("pass_random", summary=True, doc="the random legal-move player's exact win probability (the floor)"),
    MetricSpec("ctx_kl", -1, doc="mean per-token KL(student without || with the experience) on the turns played "
                                 "without it"),
    MetricSpec("hidden_cos/mean", doc="cosine of the two passes' hidden states at those tokens, mean over layers"))


def measure_games(rows: Sequence[Mapping[str, Any]], references: Mapping[str, float], *, seed: int = 0,
                  n_resamples: int) -> dict[str, float]:
    """The registered metrics of ``rows`` with their intervals over games, then ``references`` (NaN when absent)."""
    out = GAMES.measure(ItemRows(rows), seed=seed, n_resamples=n_resamples)
    out.update({k: float(references.get(k, float("nan"))) for k in REFERENCE_KEYS})
    return out
