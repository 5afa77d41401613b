"""Issue 15 item 5: does SMART's smoothness term act? R_s and how far it moves the update, over a grid of
perturbation scales (ε, the ascent step η and the initial noise σ scaled together) and λ_s.

usage: python bench/smart_sweep.py [rows] [max_len]
On the embedded SmolLM2, one micro-batch of the fine-tuning upload (SST-2 rows, the attack's own data: no
eval prompt is ever read), in process, μ = 0 (bench/smart_probe.py). Prints, per setting, R_s after the
ascent and ||g - g(λ_s = 0)|| / ||g(λ_s = 0)||: the share of the update that the regulariser changes. A
setting acts when that share is not negligible (at mt-dnn's sizes: ~1e-6)."""
import sys

from smart_probe import MT_DNN, Probe

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 4
max_len = int(sys.argv[2]) if len(sys.argv) > 2 else 128
probe = Probe("smollm2", "sst2_train.jsonl", "chat", rows, max_len)

_, g0, _ = probe.smart_grad(1.0, lambda_s=0.0)
print(f"SmolLM2, {rows} SST-2 rows x <= {max_len} tokens; scale 1 = mt-dnn's eps {MT_DNN.epsilon:g}, "
      f"step {MT_DNN.step_size:g}, noise {MT_DNN.noise_std:g}")
print("| scale | eps | lambda_s | R_s | update moved by R_s |\n|---|---|---|---|---|")
for scale in (1.0, 1e1, 1e2, 1e3, 1e4, 1e5):
    for lambda_s in (1.0, 10.0):
        m, g, _ = probe.smart_grad(scale, lambda_s=lambda_s)
        print(f"| x{scale:g} | {MT_DNN.epsilon * scale:.0e} | {lambda_s:g} | {m['smart_smooth']:.3e} | "
              f"{((g - g0).norm() / g0.norm()).item():.3e} |", flush=True)
