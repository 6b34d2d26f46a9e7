"""Multi-turn on-policy episodes against an environment (docs/design.md, "Multi-turn episodes").

The student plays every turn *without* the context; the environment answers; the teacher (and the anchored term's
with-context pass) score the student's tokens *with* it. Two formats, one invariant: **every scored token is scored
under exactly the prefix it was sampled with**.

* ``per_turn`` (:class:`PerTurnFormat`, OPCD's protocol): each model turn is one sample. Its prompt is one user
  message: a fixed preamble, the experience (teacher and anchor side only; the student's own when it is evaluated
  with it), and the game so far as text (``history: actions``: the game's own log, where each earlier move appears as
  the action the environment received, as in OPCD; ``history: replies``: each earlier reply as written, its
  reasoning block dropped unless ``keep_reasoning``). The response is the turn's sampled tokens, reasoning included.
  Turns of all games of a batch are scored together, one row each.
* ``single_sequence`` (:class:`SingleSequenceFormat`): the episode as one chat ``[system?] user(observation)
  assistant(turn 1) user(feedback) ...``, built token by token, so each turn's prefix is a prefix of the final
  sequence: one row per episode, the loss mask exactly on sampled tokens (each turn through its end-of-turn token),
  0 on observations, feedback, template tokens and padding; ``response_attention`` 1 on every real token. With
  ``keep_reasoning: false`` later turns see earlier turns without their ``<think>`` block (what Qwen3's template does
  to history), so the running sequence is no longer what each turn was sampled under: each turn is then scored as
  its own row, prefix = exactly the sequence it was sampled from.

The environment gets the reply without its reasoning block (``ChatFormat.move_text``); a turn that stops with any
end-of-sequence id (Qwen3's generation config has two) or is cut at ``max_new_tokens`` is closed with the
template's own end-of-turn token before the next user turn (a template token: never in the loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from lightning_ctx.data.batches import ContextPairBatch
from lightning_ctx.data.render import left_pad
from lightning_ctx.errors import DataError
from lightning_ctx.rollout import Rollout

MOVE, FEEDBACK = "@@MOVE@@", "@@FEEDBACK@@"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EPISODE_FORMATS = ("per_turn", "single_sequence")
HISTORIES = ("actions", "replies")

TurnSampler = Callable[[torch.Tensor, torch.Tensor], Rollout]  # (left-padded ids, mask) -> one turn each


class Game(Protocol):
    """What the episode loop needs from an environment (``lightning_ctx.tasks.games.env.TextGame``)."""

    outcome: Any

    def reset(self) -> str: ...

    def step(self, move: str) -> tuple[bool, str]: ...


def template_reads(tokenizer, name: str) -> bool:
    return name in str(getattr(tokenizer, "chat_template", None) or "")


class ChatFormat:
    """The chat template's pieces of an episode, as token ids.

    ``eos_token_ids``: every id that ends a turn when sampled (the generation config's, e.g. Qwen3's ``<|im_end|>``
    and ``<|endoftext|>``); ``end_of_turn`` is the one the template itself writes after an assistant turn.
    """

    def __init__(self, tokenizer, eos_token_ids: Sequence[int], enable_thinking: Optional[bool] = None,
                 keep_reasoning: bool = True):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("multi-turn episodes need a tokenizer with a chat template",
                            path=getattr(tokenizer, "name_or_path", None), field="chat_template")
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(set(int(e) for e in eos_token_ids))
        # passed only to templates that read it (others would ignore it; saying so keeps the record honest)
        self.template_kwargs = ({"enable_thinking": enable_thinking}
                                if enable_thinking is not None and template_reads(tokenizer, "enable_thinking") else {})
        self.keep_reasoning = keep_reasoning
        self.think_ids = None
        if not keep_reasoning:
            ids = tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])
            if any(i is None or i == tokenizer.unk_token_id for i in ids):
                raise DataError(f"keep_reasoning: false needs {THINK_OPEN} and {THINK_CLOSE} tokens in the vocabulary",
                                path=getattr(tokenizer, "name_or_path", None), field="data.task.keep_reasoning")
            self.think_ids = tuple(ids)
        self.end_of_turn, self.feedback_prefix, self.feedback_suffix = self._feedback_template()

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                                  **self.template_kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids  # chat templates write their own BOS

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_token_ids], skip_special_tokens=True)

    def first_prompt_ids(self, observation: str, context: Optional[str] = None) -> list[int]:
        """``[system: context?] user: observation`` and the assistant generation prompt."""
        messages = ([{"role": "system", "content": context}] if context else []) + [
            {"role": "user", "content": observation}]
        return self.encode(self.render(messages, generation_prompt=True))

    def feedback_ids(self, feedback: str) -> list[int]:
        return self.encode(self.feedback_prefix + feedback + self.feedback_suffix)

    def _feedback_template(self) -> tuple[int, str, str]:
        """The template's end-of-turn id, and what it writes after it up to the next generation prompt around a
        user message (derived once from the template with marker strings)."""
        text = self.render([{"role": "user", "content": "first"}, {"role": "assistant", "content": MOVE},
                            {"role": "user", "content": FEEDBACK}], generation_prompt=True)
        after = text.index(MOVE) + len(MOVE)
        eos = {self.tokenizer.convert_ids_to_tokens(i): i for i in self.eos_token_ids}
        ends = [(text.find(t, after), t) for t in eos if t and text.find(t, after) >= 0]
        if not ends:
            raise DataError(f"the chat template does not close an assistant turn with an end-of-turn token "
                            f"({', '.join(map(str, eos))})", path=getattr(self.tokenizer, "name_or_path", None),
                            field="chat_template")
        start, eos_text = min(ends)
        segment = text[start + len(eos_text):]
        if segment.count(FEEDBACK) != 1:
            raise DataError("cannot find where the chat template puts a user turn after an assistant turn",
                            field="chat_template")
        prefix, suffix = segment.split(FEEDBACK)
        return eos[eos_text], prefix, suffix

    def move_text(self, turn_ids: Sequence[int]) -> str:
        """What the environment gets: the reply after its reasoning block ("" when the turn was cut inside it)."""
        text = self.decode(turn_ids)
        if THINK_CLOSE in text:
            return text.split(THINK_CLOSE)[-1].strip()
        return "" if THINK_OPEN in text else text.strip()

    def visible_reply(self, turn_ids: Sequence[int]) -> str:
        """An earlier reply as later turns see it: whole, or without its reasoning block (``keep_reasoning``)."""
        return self.decode(turn_ids).strip() if self.keep_reasoning else self.move_text(turn_ids)

    def drop_reasoning(self, turn_ids: list[int]) -> list[int]:
        if self.think_ids is None or self.think_ids[0] not in turn_ids or self.think_ids[1] not in turn_ids:
            return turn_ids
        a, b = turn_ids.index(self.think_ids[0]), turn_ids.index(self.think_ids[1])
        return turn_ids[:a] + turn_ids[b + 1:] if a < b else turn_ids


@dataclass
class Turn:
    """One student turn: ``prefix`` is exactly the ids it was sampled from; ``response`` the sampled tokens
    through the first end-of-sequence id; ``at`` where it sits in the episode (per_turn: history entries seen;
    single_sequence: episode tokens before it)."""

    prefix: list[int]
    response: list[int]
    finished: bool
    at: int


@dataclass
class Episode:
    """One played episode: what the student saw, what it sampled, what happened."""

    game: Any
    context: Optional[str]  # what the *student* saw (None in training rollouts)
    observation: str  # the first user message
    prompt_ids: list[int] = field(default_factory=list)  # single_sequence: the first prompt
    tokens: list[int] = field(default_factory=list)  # single_sequence: everything after it
    loss_mask: list[int] = field(default_factory=list)  # single_sequence: 1 = sampled by the student
    history: list[str] = field(default_factory=list)  # per_turn: the game so far as text entries
    turns: list[Turn] = field(default_factory=list)
    transcript: list[dict] = field(default_factory=list)  # [{"role", "content", ...}] as the student saw it

    def append(self, ids: Sequence[int], sampled: bool) -> None:
        self.tokens.extend(int(i) for i in ids)
        self.loss_mask.extend([int(sampled)] * len(ids))

    @property
    def outcome(self):
        return self.game.outcome

    @property
    def student_tokens(self) -> int:
        return sum(len(t.response) for t in self.turns)

    @property
    def turns_finished(self) -> list[bool]:
        return [t.finished for t in self.turns]


@dataclass
class EpisodeRollout(Rollout):
    """Played episodes in the single-response ``Rollout`` shape the loss takes (one row per episode or per turn).

    ``response_attention`` (single_sequence, one row per episode): 1 on every real token of the response block (the
    attention mask of the teacher-forced passes), while ``response_mask`` is the loss mask; None when each row's
    response is exactly its sampled tokens.
    """

    response_attention: Optional[torch.Tensor] = None
    episodes: list[Episode] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, float]:
        """Per-batch episode statistics (logged as ``{stage}/episode_*``)."""
        outcomes = [e.outcome for e in self.episodes if e.outcome is not None]
        if not outcomes:
            return {}
        n, turns = len(outcomes), sum(o.turns for o in outcomes)
        return {"episode_pass": sum(o.passed for o in outcomes) / n,
                "episode_reward": sum(o.reward for o in outcomes) / n,
                "episode_turns": turns / n,
                "episode_invalid_rate": sum(o.invalid_moves for o in outcomes) / max(turns, 1)}

    def to(self, device) -> EpisodeRollout:
        for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "lengths", "finished",
                     "response_attention"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def turn_rows(rows: Sequence[tuple[list[int], list[int], list[int], bool]], episodes: Sequence[Episode],
              ids: list[str], context: str, pad_token_id: int) -> tuple[ContextPairBatch, EpisodeRollout]:
    """One scoring row per ``(prefix, prefix with the context, response, finished)``: the batch of prefixes without
    and with the context (left-padded) and the responses (right-padded, the loss mask on every response token)."""
    prompt_ids, prompt_mask = left_pad([r[0] for r in rows], pad_token_id)
    ctx_ids, ctx_mask = left_pad([r[1] for r in rows], pad_token_id)
    response, mask = _right_pad([r[2] for r in rows], [[1] * len(r[2]) for r in rows], pad_token_id)
    finished = torch.tensor([r[3] for r in rows], dtype=torch.bool)
    batch = ContextPairBatch(prompt_ids, prompt_mask, ctx_ids, ctx_mask, ids, [context] * len(rows),
                             [""] * len(rows), [""] * len(rows))
    return batch, EpisodeRollout(prompt_ids, prompt_mask, response, mask, mask.sum(dim=1), finished,
                                 episodes=list(episodes))


def _right_pad(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_token_id: int):
    width = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        if s:
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = torch.as_tensor(list(m), dtype=torch.bool)
    return ids, mask


class EpisodeFormat:
    """How an episode becomes prompts and scoring rows (see the module docstring); subclasses fill in the four
    steps, :func:`play_episodes` drives them."""

    name = ""
    context_role = "context"  # how a transcript names the context the student had (single_sequence: "system")

    def __init__(self, chat: ChatFormat):
        self.chat = chat

    def start(self, ep: Episode) -> None:
        raise NotImplementedError

    def prompt(self, ep: Episode) -> list[int]:
        """Exactly the ids the next turn is sampled from."""
        raise NotImplementedError

    def record(self, ep: Episode, turn: Turn, action: str, feedback: Optional[str]) -> None:
        """Take a played turn into the episode (``feedback`` None: the game ended with it)."""
        raise NotImplementedError

    def score_inputs(self, episodes: Sequence[Episode], ids: list[str], context: str,
                     pad_token_id: int) -> tuple[ContextPairBatch, EpisodeRollout]:
        """The student's prefixes (as sampled), the same prefixes with ``context``, and the sampled tokens."""
        raise NotImplementedError


@dataclass(frozen=True)
class TurnPrompt:
    """The per-turn user message (OPCD's structure in our wording): preamble, the experience block when there is
    one, the game so far, the question."""

    preamble: str = "You are an agent playing a game on a grid. Read the game so far, then choose your next move."
    experience: str = ("Experience from earlier games (rules and strategies learned so far; they may be incomplete "
                       "or wrong):\n{experience}")
    situation: str = "The game so far:\n{history}"
    question: str = "What is your next move? Write the move you choose in square brackets."
    player_line: str = "Your move: {move}"

    def text(self, history: Sequence[str], experience: Optional[str]) -> str:
        parts = [self.preamble]
        if experience:
            parts.append(self.experience.format(experience=experience))
        parts += [self.situation.format(history="\n\n".join(history)), self.question]
        return "\n\n".join(parts)


class PerTurnFormat(EpisodeFormat):
    name = "per_turn"

    def __init__(self, chat: ChatFormat, history: str = "actions", prompt: TurnPrompt = TurnPrompt()):
        super().__init__(chat)
        if history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
        self.history, self.turn_prompt = history, prompt

    def prompt_ids(self, history: Sequence[str], context: Optional[str]) -> list[int]:
        text = self.turn_prompt.text(history, context)
        return self.chat.encode(self.chat.render([{"role": "user", "content": text}], generation_prompt=True))

    def start(self, ep: Episode) -> None:
        ep.history = [ep.observation]

    def prompt(self, ep: Episode) -> list[int]:
        return self.prompt_ids(ep.history, ep.context)

    def record(self, ep: Episode, turn: Turn, action: str, feedback: Optional[str]) -> None:
        move = action if self.history == "actions" else self.chat.visible_reply(turn.response)
        ep.history.append(self.turn_prompt.player_line.format(move=move))
        if feedback is not None:
            ep.history.append(feedback)

    def score_inputs(self, episodes, ids, context, pad_token_id):
        rows, row_ids = [], []
        for game_id, ep in zip(ids, episodes):
            for k, t in enumerate(ep.turns):
                rows.append((t.prefix, self.prompt_ids(ep.history[:t.at], context), t.response, t.finished))
                row_ids.append(f"{game_id}/turn{k + 1}")
        return turn_rows(rows, episodes, row_ids, context, pad_token_id)


class SingleSequenceFormat(EpisodeFormat):
    name = "single_sequence"
    context_role = "system"

    def start(self, ep: Episode) -> None:
        ep.prompt_ids = self.chat.first_prompt_ids(ep.observation, ep.context)

    def prompt(self, ep: Episode) -> list[int]:
        return ep.prompt_ids + ep.tokens

    def record(self, ep: Episode, turn: Turn, action: str, feedback: Optional[str]) -> None:
        seen = turn.response if self.chat.keep_reasoning else self.chat.drop_reasoning(turn.response)
        # Sampled in place only when later turns see the turn as sampled (else each turn is scored on its own row)
        ep.append(seen, sampled=self.chat.keep_reasoning)
        if not seen or seen[-1] != self.chat.end_of_turn:  # cut, or stopped by another EOS id: close the turn
            ep.append([self.chat.end_of_turn], sampled=False)
        if feedback is not None:
            ep.append(self.chat.feedback_ids(feedback), sampled=False)

    def score_inputs(self, episodes, ids, context, pad_token_id):
        ctx_first = [self.chat.first_prompt_ids(e.observation, context) for e in episodes]
        if not self.chat.keep_reasoning:  # each turn under exactly its own prefix
            rows, row_ids = [], []
            for game_id, ep, first in zip(ids, episodes, ctx_first):
                for k, t in enumerate(ep.turns):
                    rows.append((t.prefix, first + ep.tokens[:t.at], t.response, t.finished))
                    row_ids.append(f"{game_id}/turn{k + 1}")
            return turn_rows(rows, episodes, row_ids, context, pad_token_id)
        # one row per episode: every turn's prefix is a prefix of the final sequence
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_token_id)
        ctx_ids, ctx_mask = left_pad(ctx_first, pad_token_id)
        response, loss_mask = _right_pad([e.tokens for e in episodes], [e.loss_mask for e in episodes], pad_token_id)
        _, attention = _right_pad([e.tokens for e in episodes], [[1] * len(e.tokens) for e in episodes],
                                  pad_token_id)
        finished = torch.tensor([all(e.turns_finished) for e in episodes], dtype=torch.bool)
        batch = ContextPairBatch(prompt_ids, prompt_mask, ctx_ids, ctx_mask, list(ids), [context] * len(episodes),
                                 [e.observation for e in episodes], [""] * len(episodes))
        return batch, EpisodeRollout(prompt_ids, prompt_mask, response, loss_mask, loss_mask.sum(dim=1), finished,
                                     response_attention=attention.long(), episodes=list(episodes))


def build_format(name: str, chat: ChatFormat, history: str = "actions") -> EpisodeFormat:
    if name == "per_turn":
        return PerTurnFormat(chat, history)
    if name == "single_sequence":
        return SingleSequenceFormat(chat)
    raise ValueError(f"episode format must be one of {EPISODE_FORMATS}, got {name!r}")


@torch.no_grad()
def play_episodes(sample: TurnSampler, fmt: EpisodeFormat, games: Sequence[Game], context: Optional[str] = None,
                  pad_token_id: int = 0, device: Any = "cpu", max_turns: int = 1_000) -> list[Episode]:
    """Play every game to its end with ``sample`` as the player, batched over the games still running.

    ``context``: what the student sees (None: without the context, as in training rollouts). A game ends itself
    (win, loss, invalid moves, its own turn limit); ``max_turns`` is a safety net only.
    """
    chat = fmt.chat
    episodes = []
    for game in games:
        observation = game.reset()
        ep = Episode(game, context, observation)
        fmt.start(ep)
        ep.transcript = ([{"role": fmt.context_role, "content": context}] if context else []) + [
            {"role": "user", "content": observation}]
        episodes.append(ep)
    active = list(range(len(episodes)))
    for _ in range(max_turns):
        if not active:
            break
        prefixes = [fmt.prompt(episodes[i]) for i in active]
        ids, mask = left_pad(prefixes, pad_token_id)
        sampled = sample(ids.to(device), mask.to(device))
        still = []
        for row, i in enumerate(active):
            ep = episodes[i]
            keep = sampled.response_mask[row].bool().cpu()
            turn = Turn(prefixes[row], sampled.response_ids[row].cpu()[keep].tolist(), bool(sampled.finished[row]),
                        at=len(ep.history) if fmt.name == "per_turn" else len(ep.tokens))
            ep.turns.append(turn)
            move = chat.move_text(turn.response)
            done, feedback = ep.game.step(move)
            sent = getattr(ep.game, "actions", None)  # what the environment took from the reply (TextGame)
            action = sent[-1] if sent else move
            ep.transcript.append({"role": "assistant", "content": chat.visible_reply(turn.response),
                                  "raw": chat.tokenizer.decode(turn.response), "action": action,
                                  "finished": turn.finished})
            fmt.record(ep, turn, action, None if done else feedback)
            if not done:
                ep.transcript.append({"role": "user", "content": feedback})
                still.append(i)
        active = still
    return episodes


class EpisodeBatch:
    """A training batch of games (seeds) that plays itself with the student: ``batch.play(sample, device)``.

    ``OnPolicyDistillation.model_step`` calls ``play`` instead of sampling single responses; it returns the
    :class:`ContextPairBatch` of prefixes without / with the context and the :class:`EpisodeRollout`, the shapes the
    loss takes. Not a dataclass, so Lightning's device transfer leaves it alone (tensors are made on ``device``).
    """

    def __init__(self, ids: list[str], seeds: list[int], context: str, make_games: Callable[[list[int]], list],
                 fmt: EpisodeFormat, pad_token_id: int):
        self.ids, self.seeds, self.context = ids, seeds, context
        self.make_games, self.fmt, self.pad_token_id = make_games, fmt, pad_token_id

    def __len__(self) -> int:
        return len(self.seeds)

    def play(self, sample: TurnSampler, device: Any = "cpu") -> tuple[ContextPairBatch, EpisodeRollout]:
        episodes = play_episodes(sample, self.fmt, self.make_games(self.seeds), None, self.pad_token_id, device)
        return self.score_inputs(episodes, device)

    def score_inputs(self, episodes: Sequence[Episode], device: Any = "cpu"
                     ) -> tuple[ContextPairBatch, EpisodeRollout]:
        batch, rollout = self.fmt.score_inputs(episodes, list(self.ids), self.context, self.pad_token_id)
        for name in ("prompt_ids", "prompt_mask", "ctx_prompt_ids", "ctx_prompt_mask"):
            setattr(batch, name, getattr(batch, name).to(device))
        rollout.prompt_ids, rollout.prompt_mask = batch.prompt_ids, batch.prompt_mask
        return batch, rollout.to(device)
