"""Every registered defense at every stage it runs in, for a few steps each, in ONE process.

    python tests/scenarios/stage_matrix.py MODEL_DIR OUT_ROOT DTYPE DS_CONFIG STEPS [NAME,...]

Each (stage, defense) goes through the real recipe body (`bulwark.recipes.loop.train`: config typed at
load, run folder, engine, streams, hook loop, export), then the exported `model/` folder is loaded back
with plain transformers and must hold finite weights that differ from the base model's. One process for
all of them because on a GPU a fresh process costs ~10 s of imports and CUDA start-up, a 2-step run
well under one. Writes OUT_ROOT/matrix.json: per run the stage, defense, seconds, final loss and
whether the reload check passed. Exits non-zero when any run failed (every run is still tried).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch


def overrides(model_dir: str, out: Path, dtype: str, ds_config: str, steps: int) -> list[str]:
    values = {
        "out_dir": out, "model.name": model_dir, "model.dtype": dtype, "launch.ds_config": ds_config,
        "data.n": 16, "data.p": 0.25, "data.max_length": 48, "data.align_n": 16, "data.template": "alpaca",
        "data.align_benign": "alpaca", "data.align_benign_n": 16,
        "train.steps": steps, "train.micro_batch_size": 2, "train.lr": 1e-3, "train.max_grad_norm": 1.0,
    }
    return [f"{k}={v}" for k, v in values.items()]


def reload_check(model_dir: Path, base: dict[str, torch.Tensor]) -> str:
    """'' when the exported folder loads, is finite and moved away from the base; else the reason."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # on the CPU: after a GPU run transformers may place the loaded model on the current CUDA device
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        return f"non-finite weights in {bad[:3]}"
    moved = [k for k, v in state.items() if k in base and not torch.equal(v, base[k])]
    return "" if moved else "no weight changed"


def main() -> None:
    from transformers import AutoModelForCausalLM

    from bulwark.defenses import REGISTRY
    from bulwark.engine import exit_after_success
    from bulwark.recipes import align, finetune, loop

    model_dir, out_root, dtype, ds_config, steps = sys.argv[1:6]
    names = sys.argv[6].split(",") if len(sys.argv) > 6 and sys.argv[6] else sorted(REGISTRY)
    out_root, steps = Path(out_root), int(steps)
    recipes = {"align": align.build_plan, "finetune": finetune.build_plan}
    base = {k: v.float().cpu() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}

    results = []
    for name in names:
        for stage in REGISTRY[name].stages:
            out = out_root / f"{stage}-{name.replace('+', '_')}"
            argv = [*overrides(model_dir, out, dtype, ds_config, steps), f"defense.name={name}"]
            t0 = time.perf_counter()
            row = {"stage": stage, "defense": name}
            try:
                loop.train(stage, loop.parse_args(argv, stage), recipes[stage])
                lines = (out / "metrics.jsonl").read_text().splitlines()
                row["loss"] = json.loads(lines[-1])["loss"]
                row["error"] = reload_check(out / "model", base) if len(lines) == steps else f"{len(lines)} steps logged"
            except Exception:  # noqa: BLE001  (every run is tried; the failure is reported below)
                row["error"] = traceback.format_exc(limit=-6)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(row)
            print(f"[{stage} {name}] {row['seconds']} s  {'ok' if not row['error'] else 'FAILED'}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    (out_root / "matrix.json").write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r["error"]]
    for row in failed:
        print(f"\n== {row['stage']} {row['defense']} ==\n{row['error']}", flush=True)
    if failed:
        sys.exit(1)
    exit_after_success()


if __name__ == "__main__":
    main()
