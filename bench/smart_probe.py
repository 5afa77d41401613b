"""What bench/smart_options.py and bench/smart_sweep.py share: one micro-batch on a model, in process, and
SMART's loss on a one-process stand-in engine (like tests/test_smart.py's `StandIn`), μ = 0 (at step 1
θ_ema = θ, so the Bregman term is 0): R_s, the ascent's δ and the gradient it leaves."""
from __future__ import annotations

from dataclasses import replace

import torch

from bulwark.data.collate import pad_collate
from bulwark.data.formats import load_examples
from bulwark.data.templates import tokenize_example
from bulwark.defenses.smart import Smart, SmartConfig
from bulwark.models import embedded_model_dir, load_model, load_tokenizer, save_tiny_llama

# mt-dnn's perturbation sizes, SMART's defaults until 4 December 2026; the probes scale these
MT_DNN = SmartConfig(noise_std=1e-5, step_size=1e-5, epsilon=1e-6)


class Probe:
    """`model` ("tiny" or "smollm2") and the first `rows` rows of `data_file`, tokenized to <= max_len."""

    def __init__(self, model: str, data_file: str, template: str, rows: int, max_len: int) -> None:
        name = str(save_tiny_llama("/tmp/smart_probe/tiny", seed=0)) if model == "tiny" else str(embedded_model_dir())
        self.module = load_model(name, "fp32")
        tok = load_tokenizer(name)
        self.batch = pad_collate([tokenize_example(e, tok, template, max_len)
                                  for e in load_examples(data_file)[:rows]], tok.pad_token_id or 0)
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.rank, self.world_size, self.partitioned = 0, 1, False

    # the engine view SMART reads
    def local_shards(self) -> list[torch.Tensor]:
        return [torch.cat([p.detach().flatten() for _, p in self.params])]

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.params

    def forward_logits(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    def smart_grad(self, scale: float = 1.0, **over: object) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """SMART at mt-dnn's sizes x `scale` (plus `over`): its metrics, the gradient of its loss, its δ."""
        cfg = replace(MT_DNN, mu=0.0, own_trace=False, noise_std=MT_DNN.noise_std * scale,
                      step_size=MT_DNN.step_size * scale, epsilon=MT_DNN.epsilon * scale, **over)
        smart = Smart(cfg, 1)
        smart.attach(self)
        self.module.zero_grad()
        captured: dict[str, torch.Tensor] = {}
        ascent = smart._adversarial_delta
        smart._adversarial_delta = lambda *a: captured.setdefault("delta", ascent(*a))
        smart.loss(self, self.batch).backward()
        for m in self.module.modules():  # drop this Smart's embedding hook before the next one
            m._forward_hooks = type(m._forward_hooks)((k, h) for k, h in m._forward_hooks.items()
                                                      if getattr(h, "__self__", None) is not smart)
        grad = torch.cat([p.grad.flatten() for _, p in self.params]).double()
        return smart.metrics(), grad, captured.get("delta")
