"""Multi-turn on-policy episodes against an environment, as one token sequence each (docs/design.md,
"Multi-turn episodes").

An episode is ``[system?] user(observation) assistant(turn 1) user(feedback) assistant(turn 2) ...``. The
student samples every assistant turn *without* the context; the environment's messages are appended as user
turns through the chat template. The sequence is built token by token, so what the student was conditioned
on when it sampled turn k is exactly the prefix of the final sequence (on-policy for every turn):

* ``ChatFormat.first_prompt_ids(observation, context)``: the rendered first user turn and the assistant
  generation prompt (with the context as the system message, or none);
* after a turn (the student's tokens through its end-of-turn token), ``ChatFormat.feedback_ids(text)``: what
  the template writes after that end-of-turn token up to the next assistant generation prompt, with the
  feedback as the user message (derived once from the template with marker strings);
* a turn cut at ``max_new_tokens`` gets the end-of-turn token appended as a template token (masked out).

``EpisodeRollout.response_mask`` (the loss mask) is 1 exactly on the tokens the student sampled (each turn
including its end-of-turn token) and 0 on observations, feedback, template tokens and padding;
``response_attention`` is 1 on every real token. The teacher and the anchored term's with-context pass score
``[context prefix | the same response block]``: alignment is by turn (the same assistant tokens, shifted by the
context's length), because everything after the first prompt is identical token for token.

Thinking models: ``enable_thinking`` is passed to chat templates that read it; ``keep_reasoning=False`` cuts
each finished turn's ``<think>...</think>`` span from the running sequence (what Qwen3's template does to
earlier turns), so later turns never see it and the loss covers the tokens that remain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from lightning_ctx.data.datamodule import ContextPairBatch
from lightning_ctx.data.render import left_pad
from lightning_ctx.errors import DataError
from lightning_ctx.rollout import Rollout

MOVE, FEEDBACK = "@@MOVE@@", "@@FEEDBACK@@"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

TurnSampler = Callable[[torch.Tensor, torch.Tensor], Rollout]  # (left-padded ids, mask) -> one turn each


class Game(Protocol):
    """What the episode loop needs from an environment (``lightning_ctx.tasks.games.env.TextGame``)."""

    outcome: Any

    def reset(self) -> str: ...

    def step(self, move: str) -> tuple[bool, str]: ...


def template_reads(tokenizer, name: str) -> bool:
    return name in str(getattr(tokenizer, "chat_template", None) or "")


class ChatFormat:
    """The chat template's pieces of an episode, as token ids (see the module docstring)."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int], enable_thinking: Optional[bool] = None,
                 keep_reasoning: bool = True):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("multi-turn episodes need a tokenizer with a chat template",
                            path=getattr(tokenizer, "name_or_path", None), field="chat_template")
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(set(int(e) for e in eos_token_ids))
        self.end_of_turn = self.eos_token_ids[0]
        # passed only to templates that read it (others would ignore it; saying so keeps the record honest)
        self.template_kwargs = ({"enable_thinking": enable_thinking}
                                if enable_thinking is not None and template_reads(tokenizer, "enable_thinking") else {})
        self.keep_reasoning = keep_reasoning
        self.think_ids = None
        if not keep_reasoning:
            ids = tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])
            if any(i is None or i == tokenizer.unk_token_id for i in ids):
                raise DataError(f"keep_reasoning: false needs {THINK_OPEN} and {THINK_CLOSE} tokens in the vocabulary",
                                path=getattr(tokenizer, "name_or_path", None), field="data.keep_reasoning")
            self.think_ids = tuple(ids)
        self.feedback_prefix, self.feedback_suffix = self._feedback_template()

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                                  **self.template_kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids  # chat templates write their own BOS

    def first_prompt_ids(self, observation: str, context: Optional[str] = None) -> list[int]:
        messages = ([{"role": "system", "content": context}] if context else []) + [
            {"role": "user", "content": observation}]
        return self.encode(self.render(messages, generation_prompt=True))

    def feedback_ids(self, feedback: str) -> list[int]:
        return self.encode(self.feedback_prefix + feedback + self.feedback_suffix)

    def _feedback_template(self) -> tuple[str, str]:
        text = self.render([{"role": "user", "content": "first"}, {"role": "assistant", "content": MOVE},
                            {"role": "user", "content": FEEDBACK}], generation_prompt=True)
        after = text.index(MOVE) + len(MOVE)
        eos_texts = [self.tokenizer.convert_ids_to_tokens(i) for i in self.eos_token_ids]
        ends = [(text.find(t, after), t) for t in eos_texts if t and text.find(t, after) >= 0]
        if not ends:
            raise DataError(f"the chat template does not close an assistant turn with an end-of-turn token "
                            f"({', '.join(map(str, eos_texts))})", path=getattr(self.tokenizer, "name_or_path", None),
                            field="chat_template")
        start, eos_text = min(ends)
        segment = text[start + len(eos_text):]
        if segment.count(FEEDBACK) != 1:
            raise DataError("cannot find where the chat template puts a user turn after an assistant turn",
                            field="chat_template")
        prefix, suffix = segment.split(FEEDBACK)
        return prefix, suffix

    def move_text(self, turn_ids: list[int]) -> str:
        """The text sent to the environment: the turn decoded, without a reasoning block."""
        text = self.tokenizer.decode(turn_ids, skip_special_tokens=True)
        return text.split(THINK_CLOSE)[-1] if THINK_CLOSE in text else text

    def drop_reasoning(self, turn_ids: list[int]) -> list[int]:
        if self.think_ids is None or self.think_ids[0] not in turn_ids or self.think_ids[1] not in turn_ids:
            return turn_ids
        a, b = turn_ids.index(self.think_ids[0]), turn_ids.index(self.think_ids[1])
        return turn_ids[:a] + turn_ids[b + 1:] if a < b else turn_ids


@dataclass
class Episode:
    """One played episode: the first prompt (no context), everything after it, and what happened."""

    game: Any
    context: Optional[str]  # what the *student* saw as its system message (None in training rollouts)
    observation: str  # the first user message
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # everything after the first prompt
    loss_mask: list[int] = field(default_factory=list)  # 1 = sampled by the student
    transcript: list[dict] = field(default_factory=list)  # [{"role", "content"}] as the student saw it
    turns_finished: list[bool] = field(default_factory=list)  # each turn ended with an end-of-turn token

    def append(self, ids: Sequence[int], sampled: bool) -> None:
        self.tokens.extend(int(i) for i in ids)
        self.loss_mask.extend([int(sampled)] * len(ids))

    @property
    def outcome(self):
        return self.game.outcome

    @property
    def student_tokens(self) -> int:
        return sum(self.loss_mask)


@torch.no_grad()
def play_episodes(sample: TurnSampler, chat: ChatFormat, games: Sequence[Game], context: Optional[str] = None,
                  pad_token_id: int = 0, device: Any = "cpu", max_turns: int = 1_000) -> list[Episode]:
    """Play every game to its end with ``sample`` as the player, batched over the games still running.

    ``context``: the student's system message (None: without the context, as in training rollouts). A game
    ends itself (win, loss, invalid moves, its own turn limit); ``max_turns`` is a safety net only.
    """
    episodes = []
    for game in games:
        observation = game.reset()
        ep = Episode(game, context, observation, chat.first_prompt_ids(observation, context))
        ep.transcript = ([{"role": "system", "content": context}] if context else []) + [
            {"role": "user", "content": observation}]
        episodes.append(ep)
    active = list(range(len(episodes)))
    for _ in range(max_turns):
        if not active:
            break
        ids, mask = left_pad([episodes[i].prompt_ids + episodes[i].tokens for i in active], pad_token_id)
        turn = sample(ids.to(device), mask.to(device))
        still = []
        for row, i in enumerate(active):
            ep = episodes[i]
            keep = turn.response_mask[row].bool().cpu()
            turn_ids = turn.response_ids[row].cpu()[keep].tolist()
            finished = bool(turn.finished[row])
            move = chat.move_text([t for t in turn_ids if t not in chat.eos_token_ids])
            ep.transcript.append({"role": "assistant", "content": move if chat.keep_reasoning else move.strip(),
                                  "raw": chat.tokenizer.decode(turn_ids), "finished": finished})
            if not chat.keep_reasoning:
                turn_ids = chat.drop_reasoning(turn_ids)
            ep.append(turn_ids, sampled=True)
            ep.turns_finished.append(finished)
            if not finished:  # cut at max_new_tokens: close the turn as the template would (not sampled)
                ep.append([chat.end_of_turn], sampled=False)
            done, feedback = ep.game.step(move)
            if not done:
                ep.append(chat.feedback_ids(feedback), sampled=False)
                ep.transcript.append({"role": "user", "content": feedback})
                still.append(i)
        active = still
    return episodes


@dataclass
class EpisodeRollout(Rollout):
    """A batch of episodes in the single-response ``Rollout`` shape the loss takes.

    ``prompt_*``: the first prompts without the context (left-padded); ``response_ids``: everything after
    them (right-padded); ``response_mask``: the loss mask (student tokens only); ``response_attention``: 1 on
    every real token of the response block (the attention mask of the teacher-forced passes).
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


def episode_rollout(episodes: Sequence[Episode], pad_token_id: int) -> EpisodeRollout:
    """Stack played episodes into an :class:`EpisodeRollout` (CPU tensors)."""
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_token_id)
    width = max(max(len(e.tokens) for e in episodes), 1)
    B = len(episodes)
    response = torch.full((B, width), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((B, width), dtype=torch.bool)
    attention = torch.zeros((B, width), dtype=torch.long)
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        if n:
            response[i, :n] = torch.as_tensor(e.tokens, dtype=torch.long)
            loss_mask[i, :n] = torch.as_tensor(e.loss_mask, dtype=torch.bool)
            attention[i, :n] = 1
    finished = torch.tensor([all(e.turns_finished) for e in episodes], dtype=torch.bool)
    return EpisodeRollout(prompt_ids, prompt_mask, response, loss_mask, loss_mask.sum(dim=1), finished,
                          response_attention=attention, episodes=list(episodes))


def rollout_to(rollout: EpisodeRollout, device) -> EpisodeRollout:
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "lengths", "finished",
                 "response_attention"):
        setattr(rollout, name, getattr(rollout, name).to(device))
    return rollout


class EpisodeBatch:
    """A training batch of games (seeds) that plays itself with the student: ``batch.play(sample, device)``.

    ``OnPolicyDistillation.model_step`` calls ``play`` instead of sampling single responses; it returns the
    :class:`ContextPairBatch` of first prompts without / with the context (the experience as the system message)
    and the :class:`EpisodeRollout`, the shapes the loss takes. Not a dataclass, so Lightning's device transfer
    leaves it alone (the tensors are made on ``device`` when played).
    """

    def __init__(self, ids: list[str], seeds: list[int], context: str, make_games: Callable[[list[int]], list],
                 chat: ChatFormat, pad_token_id: int):
        self.ids, self.seeds, self.context = ids, seeds, context
        self.make_games, self.chat, self.pad_token_id = make_games, chat, pad_token_id

    def __len__(self) -> int:
        return len(self.seeds)

    def play(self, sample: TurnSampler, device: Any = "cpu") -> tuple[ContextPairBatch, EpisodeRollout]:
        episodes = play_episodes(sample, self.chat, self.make_games(self.seeds), None, self.pad_token_id, device)
        return self.score_inputs(episodes, device)

    def score_inputs(self, episodes: Sequence[Episode], device: Any = "cpu"
                     ) -> tuple[ContextPairBatch, EpisodeRollout]:
        rollout = rollout_to(episode_rollout(episodes, self.pad_token_id), device)
        ctx_ids, ctx_mask = left_pad([self.chat.first_prompt_ids(e.observation, self.context) for e in episodes],
                                     self.pad_token_id)
        batch = ContextPairBatch(rollout.prompt_ids, rollout.prompt_mask, ctx_ids.to(device), ctx_mask.to(device),
                                 list(self.ids), [self.context] * len(episodes), [e.observation for e in episodes],
                                 [""] * len(episodes))
        return batch, rollout
