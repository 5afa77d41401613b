"""Issue 19 item 2: SMART's ascent options at mt-dnn's perturbation sizes (x eps_scale), one micro-batch.

usage: python bench/smart_options.py {tiny|smollm2} [rows] [max_len] [eps_scale]
For each (ascent_divergence, normalize): R_s after the ascent, |δ|, and how far R_s moves the
gradient (||g - g(λ_s=0)|| / ||g(λ_s=0)||), with μ = 0 (bench/smart_probe.py)."""
import sys

import torch.nn.functional as F
from smart_probe import Probe

which = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
max_len = int(sys.argv[3]) if len(sys.argv) > 3 else 128
scale = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
probe = Probe(which, "alpaca.jsonl", "alpaca", rows, max_len)

_, g0, _ = probe.smart_grad(scale, lambda_s=0.0)
print(f"model={which} rows={rows} max_len={max_len} eps/step/noise = mt-dnn's x{scale}")
for div in ("symmetric", "forward", "reverse"):
    for norm in ("token", "example"):
        m, g, d = probe.smart_grad(scale, ascent_divergence=div, normalize=norm)
        if (div, norm) == ("symmetric", "token"):
            d_ref = d
        cos = F.cosine_similarity(d.flatten().double(), d_ref.flatten().double(), dim=0).item()
        print(f"  {div:9s} {norm:7s} R_s={m['smart_smooth']:.3e}  mean|δ|={d.abs().mean():.3e}  "
              f"cos(δ, δ_sym_token)={cos:.4f}  update moved by R_s: {((g - g0).norm() / g0.norm()).item():.3e}")
