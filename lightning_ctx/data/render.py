"""Render one record twice (without and with its context) and join prompts with a shared response.

Alignment contract: for a prefix of padded width ``P`` followed by a response block of width ``R``,
the logits that score response token ``j`` sit at position ``P - 1 + j``. Student (``prompt``) and
teacher (``context + prompt``) prefixes differ in width, but both are joined with the *same*
response ids, so slicing each at its own ``P`` gives ``[B, R, V]`` blocks that line up token by token.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from lightning_ctx.data.records import DataError

PLAIN_WITH_CONTEXT = "{context}\n\n{prompt}\n"
PLAIN_NO_CONTEXT = "{prompt}\n"


class PromptRenderer:
    """Turns ``(prompt, context)`` into token ids with the tokenizer's chat template or a plain one.

    ``template``: ``auto`` (chat template when the tokenizer has one), ``chat`` (required) or
    ``plain``. In chat mode the context is the system message.
    """

    def __init__(self, tokenizer, template: str = "auto", plain_with_context: str = PLAIN_WITH_CONTEXT,
                 plain_no_context: str = PLAIN_NO_CONTEXT):
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be auto, chat or plain, got {template!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise DataError("template 'chat' was requested but the tokenizer has no chat_template "
                            "(use template: plain, or a tokenizer with a chat template)",
                            path=getattr(tokenizer, "name_or_path", None), field="chat_template")
        self.tokenizer = tokenizer
        self.use_chat = has_chat and template != "plain"
        if template == "auto" and not has_chat:
            # every accuracy, the teacher's included, is then measured on prompts the model was never tuned for
            warnings.warn(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no chat template: prompts use "
                          "the plain template (context, blank line, prompt). Set data.template: plain if that is "
                          "intended, or give a tokenizer with a chat template (data.template: chat requires one)",
                          UserWarning, stacklevel=2)
        self.plain_with_context = plain_with_context
        self.plain_no_context = plain_no_context

    def text(self, prompt: str, context: str | None = None) -> str:
        if self.use_chat:
            messages = ([{"role": "system", "content": context}] if context else []) + [
                {"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if context:
            return self.plain_with_context.format(context=context, prompt=prompt)
        return self.plain_no_context.format(prompt=prompt)

    def ids(self, prompt: str, context: str | None = None) -> list[int]:
        # Chat templates write their own BOS; plain text gets the tokenizer's special tokens.
        return self.tokenizer(self.text(prompt, context), add_special_tokens=not self.use_chat).input_ids


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to ``[B, max_len]`` ids and attention mask (decoder-only generation needs left padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask
