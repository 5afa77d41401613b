"""Loss functions shared by the recipes and the defenses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips: prompt and padding tokens


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled (response) tokens of one micro-batch.

    Computed here rather than by the model so that every defense and the plain-PyTorch reference in
    the tests use one definition: shift by one, ignore -100, average over labelled tokens.
    """
    return causal_lm_nll(F.log_softmax(logits[:, :-1, :].float(), dim=-1), labels)


def causal_lm_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss` from log-probabilities already computed (cross entropy is the NLL of
    log_softmax), for a caller that shares one softmax among several terms (SMART). `log_probs` may
    cover every position or all but the last: the last position predicts nothing."""
    shifted = log_probs[:, : labels.size(1) - 1, :]
    return F.nll_loss(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward `model` (an engine, or its module for extra passes) on a batch and return the loss."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_loss(out.logits, batch["labels"])
