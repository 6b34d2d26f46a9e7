"""The rule world: the package's built-in task, where a context changes the right answer.

Pure Python (no torch) so it can be used anywhere, including data-prep scripts.

The world
---------
* Input ``x``: three digits, written space-separated, e.g. ``"3 1 4"`` (this is the prompt).
* Operations (``BASE_OPS``): ``ADD1`` .. ``ADD4`` add k (mod 10) to every digit; ``REV`` reverses
  the three digits. ``SHOW`` is a *format*: the answer is written ``x = f(x)`` (7 tokens instead of 3).
* A context holds 1-2 base operations applied left to right (``ADD2 ADD2`` = +4,
  ``ADD1 REV`` = add 1 then reverse), optionally followed by ``SHOW``; ``SHOW`` alone is also a
  context (answer ``x = x``). ``ALL_CONTEXTS`` lists these 61 in-distribution contexts.
  ``apply_context`` accepts any number of base ops (useful for out-of-distribution probes) but
  ``SHOW`` may only come last.
* **Without a context the right answer is a mixture**: with probability 1/2 the identity, otherwise a
  *hidden* operation drawn uniformly from ``HIDDEN_OPS = BASE_OPS + ("SHOW",)`` (six ops, 1/12 each).
  ``SHOW`` is deliberately one of the hidden ops: the base model without context then writes
  ``x = x`` with probability ~1/12, i.e. it puts some but not overwhelming mass on the SHOW format.
  On-policy distillation toward the ``SHOW`` context needs exactly that: the student must
  occasionally sample the teacher's format without the context, or the reverse-KL signal vanishes.
  Note that identity and ``SHOW`` share the first three answer tokens; they split at the fourth
  token (``<eot>`` with ~6/7, ``=`` with ~1/7 given the prefix).

Splits
------
The 1000 possible inputs are split, by a fixed permutation that does not depend on any seed, into
disjoint pools: ``train`` (800 inputs), ``val`` (100) and ``test`` (100). ``make_records`` draws
the inputs of a split only from that split's pool, so val/test inputs are never train inputs for any
seed. The pretrained base (``lightning_ctx.tasks.world.pretrain``) is trained on ``train``-pool inputs only
and evaluated on the 200 held-out ``val`` + ``test`` inputs. The seed picks and orders the inputs:
``n <= pool size`` draws without replacement; larger ``n`` concatenates independent reshuffles of the
pool (so inputs repeat). The inputs depend on ``(seed, split)`` but not on the context, so records of
different contexts with the same seed and split are paired over the same inputs.

Record ids are ``world-{context}-{split}-{i}`` with spaces in the context replaced by ``_``
(e.g. ``world-ADD2_ADD2-train-0``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

BASE_OPS: tuple[str, ...] = ("ADD1", "ADD2", "ADD3", "ADD4", "REV")
SHOW = "SHOW"
#: Hidden operations of the no-context mixture (drawn uniformly, see module docstring).
HIDDEN_OPS: tuple[str, ...] = BASE_OPS + (SHOW,)
#: Probability that the no-context answer is the identity.
NO_CONTEXT_IDENTITY_PROB = 0.5
IDENTITY = "IDENTITY"
#: Every symbol the world can write (prompts, answers and contexts).
WORLD_SYMBOLS: tuple[str, ...] = tuple(str(d) for d in range(10)) + BASE_OPS + (SHOW, "=")

SPLITS = ("train", "val", "test")
_POOL_SIZES = {"train": 800, "val": 100, "test": 100}
_POOL_PERMUTATION_SEED = "lightning_ctx.world.input-pools.v1"  # fixed: pools never depend on a seed


def _build_contexts() -> list[str]:
    out: list[str] = []
    for n_ops in (1, 2):
        for ops in itertools.product(BASE_OPS, repeat=n_ops):
            c = " ".join(ops)
            out.append(c)
            out.append(f"{c} {SHOW}")
    out.append(SHOW)
    return out


#: The 61 in-distribution contexts: 1-2 base ops (ordered, repeats allowed), each with and without a
#: trailing SHOW, plus SHOW alone.
ALL_CONTEXTS: list[str] = _build_contexts()


# --------------------------------------------------------------------------------------------------
# parsing and applying
# --------------------------------------------------------------------------------------------------

def normalize_context(context: str | None) -> str:
    """Collapse whitespace: ``" ADD2   ADD2 "`` -> ``"ADD2 ADD2"``; None -> ``""``."""
    return " ".join((context or "").split())


def parse_context(context: str) -> tuple[tuple[str, ...], bool]:
    """``"ADD1 REV SHOW"`` -> ``(("ADD1", "REV"), True)``. Raises ValueError on bad contexts."""
    words = normalize_context(context).split()
    if not words:
        raise ValueError("empty context: without a context the world's answer is a mixture; "
                         "use sample_no_context_answer / no_context_answer_distribution")
    show = words[-1] == SHOW
    ops = tuple(words[:-1] if show else words)
    for w in ops:
        if w not in BASE_OPS:
            where = "SHOW may only be the last word" if w == SHOW else f"unknown operation {w!r}"
            raise ValueError(f"bad world context {context!r}: {where} (operations: {', '.join(HIDDEN_OPS)})")
    return ops, show


def is_in_distribution(context: str) -> bool:
    return normalize_context(context) in _CONTEXT_SET


def parse_digits(digits: str | Sequence[int]) -> tuple[int, int, int]:
    """``"3 1 4"`` / ``"314"`` / ``[3, 1, 4]`` -> ``(3, 1, 4)``."""
    if isinstance(digits, str):
        chars = "".join(digits.split())
        if len(chars) != 3 or not chars.isdigit():
            raise ValueError(f"a world prompt is three digits, got {digits!r}")
        vals = tuple(int(ch) for ch in chars)
    else:
        vals = tuple(int(d) for d in digits)
        if len(vals) != 3 or any(not 0 <= d <= 9 for d in vals):
            raise ValueError(f"a world input is three digits 0-9, got {digits!r}")
    return vals  # type: ignore[return-value]


def format_digits(digits: Sequence[int]) -> str:
    return " ".join(str(d) for d in digits)


def _apply_op(op: str, x: tuple[int, ...]) -> tuple[int, ...]:
    if op == "REV":
        return tuple(reversed(x))
    k = int(op[3:])  # ADDk
    return tuple((d + k) % 10 for d in x)


def apply_ops(ops: Iterable[str], digits: Sequence[int]) -> tuple[int, ...]:
    x = tuple(digits)
    for op in ops:
        x = _apply_op(op, x)
    return x


def apply_context(context: str, digits: str | Sequence[int]) -> str:
    """The right answer under ``context``: ``apply_context("ADD1 REV SHOW", "3 1 4") == "3 1 4 = 5 2 4"``."""
    ops, show = parse_context(context)
    x = parse_digits(digits)
    y = format_digits(apply_ops(ops, x))
    return f"{format_digits(x)} = {y}" if show else y


def context_signature(context: str) -> tuple[int, bool, bool]:
    """The function a context computes: ``(shift mod 10, reversed?, SHOW?)``.

    Contexts with equal signatures are equivalent (``ADD1 ADD1`` == ``ADD2``, ``REV REV SHOW`` == ``SHOW``).
    """
    ops, show = parse_context(context)
    shift = sum(int(op[3:]) for op in ops if op != "REV") % 10
    rev = sum(op == "REV" for op in ops) % 2 == 1
    return shift, rev, show


def other_contexts(target: str, exclude_equivalent: bool = False) -> list[str]:
    """In-distribution contexts other than ``target`` (for the retention metric).

    With ``exclude_equivalent`` also drop contexts computing the same function as ``target``.
    """
    t = normalize_context(target)
    out = [c for c in ALL_CONTEXTS if c != t]
    if exclude_equivalent:
        sig = context_signature(t)
        out = [c for c in out if context_signature(c) != sig]
    return out


# --------------------------------------------------------------------------------------------------
# the no-context mixture
# --------------------------------------------------------------------------------------------------

def _hidden_answer(op: str, x: tuple[int, int, int]) -> str:
    if op == IDENTITY:
        return format_digits(x)
    return apply_context(op, x)


def no_context_mixture() -> dict[str, float]:
    """``{"IDENTITY": 0.5, "ADD1": 1/12, ..., "SHOW": 1/12}``."""
    p_hidden = (1.0 - NO_CONTEXT_IDENTITY_PROB) / len(HIDDEN_OPS)
    return {IDENTITY: NO_CONTEXT_IDENTITY_PROB, **{op: p_hidden for op in HIDDEN_OPS}}


def sample_no_context_answer(digits: str | Sequence[int], rng: random.Random) -> tuple[str, str]:
    """One draw of the no-context answer: ``(answer, op)`` with op ``"IDENTITY"`` or a hidden op."""
    x = parse_digits(digits)
    if rng.random() < NO_CONTEXT_IDENTITY_PROB:
        op = IDENTITY
    else:
        op = HIDDEN_OPS[rng.randrange(len(HIDDEN_OPS))]
    return _hidden_answer(op, x), op


def no_context_answer_distribution(digits: str | Sequence[int]) -> dict[str, float]:
    """Exact distribution over answer strings without context (coinciding answers are merged,
    e.g. ``REV`` of a palindrome is the identity)."""
    x = parse_digits(digits)
    dist: dict[str, float] = {}
    for op, p in no_context_mixture().items():
        a = _hidden_answer(op, x)
        dist[a] = dist.get(a, 0.0) + p
    return dist


def classify_no_context_answer(digits: str | Sequence[int], response: str) -> list[str]:
    """Which mixture components (``IDENTITY`` / hidden ops) a response matches (empty: none)."""
    x = parse_digits(digits)
    return [op for op in no_context_mixture() if world_verifier(response, _hidden_answer(op, x))]


# --------------------------------------------------------------------------------------------------
# records and splits
# --------------------------------------------------------------------------------------------------

def _all_inputs() -> list[tuple[int, int, int]]:
    return [tuple(int(c) for c in f"{i:03d}") for i in range(1000)]  # type: ignore[misc]


def _build_pools() -> dict[str, list[tuple[int, int, int]]]:
    inputs = _all_inputs()
    random.Random(_POOL_PERMUTATION_SEED).shuffle(inputs)
    pools, start = {}, 0
    for split in SPLITS:
        pools[split] = sorted(inputs[start:start + _POOL_SIZES[split]])
        start += _POOL_SIZES[split]
    return pools


INPUT_POOLS: dict[str, list[tuple[int, int, int]]] = _build_pools()


def split_inputs(split: str) -> list[tuple[int, int, int]]:
    """The (sorted) input pool of a split; the pools are disjoint and cover all 1000 inputs."""
    if split not in INPUT_POOLS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return list(INPUT_POOLS[split])


def draw_inputs(n: int, seed: int, split: str) -> list[tuple[int, int, int]]:
    """``n`` inputs from the split's pool, seeded by ``(seed, split)`` (see module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = split_inputs(split)
    rng = random.Random(f"lightning_ctx.world/{split}/{int(seed)}")
    out: list[tuple[int, int, int]] = []
    while len(out) < n:
        chunk = list(pool)
        rng.shuffle(chunk)
        out.extend(chunk[: n - len(out)])
    return out


def record_id(context: str, split: str, i: int) -> str:
    return f"world-{normalize_context(context).replace(' ', '_')}-{split}-{i}"


def make_records(context: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` task records ``{id, context, prompt, answer}`` for one context (deterministic per seed)."""
    ctx = normalize_context(context)
    parse_context(ctx)  # validate early
    return [
        {"id": record_id(ctx, split, i), "context": ctx, "prompt": format_digits(x), "answer": apply_context(ctx, x)}
        for i, x in enumerate(draw_inputs(n, seed, split))
    ]


def make_world_split(target_context: str, n_train: int, n_val: int, n_test: int,
                     seed: int = 0) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...], "test": [...]}`` for one target context, disjoint inputs."""
    return {
        "train": make_records(target_context, n_train, seed, "train"),
        "val": make_records(target_context, n_val, seed, "val"),
        "test": make_records(target_context, n_test, seed, "test"),
    }


# --------------------------------------------------------------------------------------------------
# verifier
# --------------------------------------------------------------------------------------------------

def _canon(text: str) -> str:
    # Every symbol of a world answer is a single character (digits, '='), so dropping all whitespace
    # is lossless and accepts odd spacing such as "3 1 4=5 3 6" or " 3  1 4 = 536 ".
    return "".join(text.split())


def world_verifier(response: str, answer: str) -> bool:
    """Right iff the response equals the answer up to whitespace (plain or SHOW format)."""
    got = _canon(response)
    return bool(got) and got == _canon(answer)


def parse_world_answer(answer: str) -> str | None:
    """The normalised gold answer (``"d d d"`` or ``"d d d = d d d"``), None if not a world answer."""
    c = _canon(answer)
    if len(c) == 3 and c.isdigit():
        return format_digits(int(ch) for ch in c)
    if len(c) == 7 and c[3] == "=" and (c[:3] + c[4:]).isdigit():
        return f"{format_digits(int(ch) for ch in c[:3])} = {format_digits(int(ch) for ch in c[4:])}"
    return None


world_verifier.parse_answer = parse_world_answer  # type: ignore[attr-defined]  # see data.verifiers.answer_parser

_CONTEXT_SET = frozenset(ALL_CONTEXTS)
