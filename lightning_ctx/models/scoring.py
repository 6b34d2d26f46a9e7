"""Teacher-forced scoring: joining a prefix with a response, and one forward pass that returns the
logits (and hidden states) at the response positions. Used by the module's losses and by evaluation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def eval_mode(module):
    """Every submodule in eval mode inside; each one's own mode restored after (no ``.eval()`` leaks out)."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:  # the flag only: no ``eval()`` override of a wrapper runs
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as HF ``generate`` computes them, so scoring matches sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ScoringInputs:
    """``prefix | response`` joined for a teacher-forced pass; ``prefix_len`` is the padded prefix width."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix_len: int
    response_len: int


def join_prompt_and_response(prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, response_ids: torch.Tensor,
                             response_mask: torch.Tensor) -> ScoringInputs:
    """Concatenate a left-padded prefix with a right-padded response block (same ids for every prefix)."""
    if prefix_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"batch mismatch: prefix {tuple(prefix_ids.shape)} vs response {tuple(response_ids.shape)}")
    input_ids = torch.cat([prefix_ids, response_ids.to(prefix_ids.device)], dim=1)
    attention_mask = torch.cat([prefix_mask.long(), response_mask.long().to(prefix_mask.device)], dim=1)
    return ScoringInputs(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask),
                         prefix_len=prefix_ids.shape[1], response_len=response_ids.shape[1])


def response_logits(model, inputs: ScoringInputs, vocab_size: int | None = None,
                    output_hidden_states: bool = False):
    """Run ``model`` teacher-forced and return logits ``[B, R, V]`` scoring each response token.

    Only the last ``R + 1`` positions go through the LM head (``logits_to_keep``), so a long context
    never materialises ``[B, P, V]`` logits. ``vocab_size`` trims padded embedding rows so teacher
    and student logits share one vocabulary. With ``output_hidden_states`` returns ``(logits, hidden)``.
    """
    R = inputs.response_len
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids, logits_to_keep=R + 1, use_cache=False,
                output_hidden_states=output_hidden_states)
    logits = out.logits[:, :R]  # position P-1+j predicts response token j; the last kept one predicts past the block
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if output_hidden_states:
        return logits, out.hidden_states
    return logits
