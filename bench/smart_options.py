"""Issue 19 item 2: SMART's ascent options at the defaults (and at a larger ε), one micro-batch in process.

usage: python bench/smart_options.py {tiny|smollm2} [rows] [max_len] [eps_scale]
For each (ascent_divergence, normalize): R_s after the ascent, |δ|, and how far R_s moves the
gradient (||g - g(λ_s=0)|| / ||g(λ_s=0)||), with μ = 0 (at step 1 θ_ema = θ, the Bregman term is 0)."""
import sys

import torch
import torch.nn.functional as F

from bulwark.data.collate import pad_collate
from bulwark.data.formats import load_examples
from bulwark.data.templates import tokenize_example
from bulwark.defenses.smart import Smart, SmartConfig
from bulwark.models import embedded_model_dir, load_model, load_tokenizer, save_tiny_llama

which = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
max_len = int(sys.argv[3]) if len(sys.argv) > 3 else 128
scale = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
name = str(save_tiny_llama("/tmp/w19/tiny", seed=0)) if which == "tiny" else str(embedded_model_dir())
model = load_model(name, "fp32")
tok = load_tokenizer(name)
batch = pad_collate([tokenize_example(e, tok, "alpaca", max_len) for e in load_examples("alpaca.jsonl")[:rows]],
                    tok.pad_token_id or 0)
params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class View:
    rank, world_size, module = 0, 1, model

    def local_shards(self):
        return [torch.cat([p.detach().flatten() for _, p in params])]

    def trainable_parameters(self):
        return params

    def forward_logits(self, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def run(**over):
    cfg = SmartConfig(mu=0.0, own_trace=False, **over)
    cfg.noise_std, cfg.step_size, cfg.epsilon = cfg.noise_std * scale, cfg.step_size * scale, cfg.epsilon * scale
    smart = Smart(cfg, 1)
    smart.attach(View())
    model.zero_grad()
    captured = {}
    orig = smart._adversarial_delta
    smart._adversarial_delta = lambda *a: captured.setdefault("d", orig(*a))
    smart.loss(View(), batch).backward()
    for m in model.modules():  # drop this Smart's embedding hook before the next one
        m._forward_hooks = type(m._forward_hooks)((k, h) for k, h in m._forward_hooks.items()
                                                  if getattr(h, "__self__", None) is not smart)
    return smart.metrics(), torch.cat([p.grad.flatten() for _, p in params]).double(), captured.get("d")


_, g0, _ = run(lambda_s=0.0)
print(f"model={which} rows={rows} max_len={max_len} eps/step/noise x{scale}")
for div in ("symmetric", "forward", "reverse"):
    for norm in ("token", "example"):
        m, g, d = run(ascent_divergence=div, normalize=norm)
        if (div, norm) == ("symmetric", "token"):
            d_ref = d
        cos = F.cosine_similarity(d.flatten().double(), d_ref.flatten().double(), dim=0).item()
        print(f"  {div:9s} {norm:7s} R_s={m['smart_smooth']:.3e}  mean|δ|={d.abs().mean():.3e}  "
              f"cos(δ, δ_sym_token)={cos:.4f}  update moved by R_s: {((g - g0).norm() / g0.norm()).item():.3e}")
