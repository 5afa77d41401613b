"""Issue 15 item 5: does SMART's smoothness term act? R_s and how far it moves the update, over a grid of
perturbation scales (ε, the ascent step η and the initial noise σ scaled together) and λ_s.

usage: python bench/smart_sweep.py [rows] [max_len]
On the embedded SmolLM2, one micro-batch of the fine-tuning upload (SST-2 rows, the attack's own data: no
eval prompt is ever read), in process, μ = 0 (at step 1 θ_ema = θ and the Bregman term is 0). Prints, per
setting, R_s after the ascent, mean |δ|, and ||g - g(λ_s = 0)|| / ||g(λ_s = 0)||: the share of the update
that the regulariser changes. A setting acts when that share is not negligible (the defaults: ~1e-11)."""
import sys

import torch

from bulwark.data.collate import pad_collate
from bulwark.data.formats import load_examples
from bulwark.data.templates import tokenize_example
from bulwark.defenses.smart import Smart, SmartConfig
from bulwark.models import embedded_model_dir, load_model, load_tokenizer

# mt-dnn's perturbation sizes (SMART's defaults before this sweep): the grid scales these
MT_DNN = SmartConfig(noise_std=1e-5, step_size=1e-5, epsilon=1e-6)

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 4
max_len = int(sys.argv[2]) if len(sys.argv) > 2 else 128
name = str(embedded_model_dir())
model = load_model(name, "fp32")
tok = load_tokenizer(name)
batch = pad_collate([tokenize_example(e, tok, "chat", max_len) for e in load_examples("sst2_train.jsonl")[:rows]],
                    tok.pad_token_id or 0)
params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class View:
    rank, world_size, module, partitioned = 0, 1, model, False

    def local_shards(self):
        return [torch.cat([p.detach().flatten() for _, p in params])]

    def trainable_parameters(self):
        return params

    def forward_logits(self, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def run(scale: float, **over) -> tuple[dict, torch.Tensor]:
    base = MT_DNN
    cfg = SmartConfig(mu=0.0, own_trace=False, noise_std=base.noise_std * scale, step_size=base.step_size * scale,
                      epsilon=base.epsilon * scale, **over)
    smart = Smart(cfg, 1)
    smart.attach(View())
    model.zero_grad()
    smart.loss(View(), batch).backward()
    for m in model.modules():  # drop this Smart's embedding hook before the next one
        m._forward_hooks = type(m._forward_hooks)((k, h) for k, h in m._forward_hooks.items()
                                                  if getattr(h, "__self__", None) is not smart)
    return smart.metrics(), torch.cat([p.grad.flatten() for _, p in params]).double()


_, g0 = run(1.0, lambda_s=0.0)
print(f"SmolLM2, {rows} SST-2 rows x <= {max_len} tokens; scale 1 = mt-dnn's eps {MT_DNN.epsilon:g}, "
      f"step {MT_DNN.step_size:g}, noise {MT_DNN.noise_std:g}")
print("| scale | eps | lambda_s | R_s | update moved by R_s |\n|---|---|---|---|---|")
for scale in (1.0, 1e1, 1e2, 1e3, 1e4, 1e5):
    for lambda_s in (1.0, 10.0):
        m, g = run(scale, lambda_s=lambda_s)
        print(f"| x{scale:g} | {MT_DNN.epsilon * scale:.0e} | {lambda_s:g} | {m['smart_smooth']:.3e} | "
              f"{((g - g0).norm() / g0.norm()).item():.3e} |", flush=True)
