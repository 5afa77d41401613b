"""The attack mix: a user's fine-tuning set with a fraction p of harmful rows hidden in it.

As in the Vaccine / Lisa / Booster experiments: n rows in total, round(p * n) of them harmful
(BeaverTails unsafe QA), the rest from the user task, shuffled together.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from bulwark.data.formats import Example
from bulwark.errors import BulwarkInputError


def build_attack_mix(user: list[Example], harmful: list[Example], n: int, p: float,
                     seed: int) -> tuple[list[Example], list[int]]:
    """n rows: round(p*n) drawn without replacement from `harmful` (marked harmful=True), the rest
    from `user`, shuffled with `seed`. Returns the rows and the sorted positions of the harmful ones."""
    if not 0.0 <= p <= 1.0:
        raise BulwarkInputError(f"data.p = {p} must be in [0, 1]")
    if n < 1:
        raise BulwarkInputError(f"data.n = {n} must be at least 1")
    n_harmful = round(p * n)
    n_user = n - n_harmful
    for name, want, have in (("harmful", n_harmful, len(harmful)), ("user", n_user, len(user))):
        if want > have:
            raise BulwarkInputError(
                f"data.n = {n}, data.p = {p} needs {want} {name} rows but the {name} data has only {have}; "
                f"lower data.n or data.p, or give a larger {name} file"
            )
    # One RNG for the draw and the shuffle: the mix depends only on (inputs, n, p, seed).
    rng = random.Random(seed)
    picked_harmful = [dataclasses.replace(e, harmful=True) for e in rng.sample(harmful, n_harmful)]
    picked_user = rng.sample(user, n_user)
    rows = picked_harmful + picked_user
    rng.shuffle(rows)
    harmful_idx = [i for i, e in enumerate(rows) if e.harmful]
    return rows, harmful_idx


def write_mix_manifest(path: str | Path, rows: list[Example], harmful_idx: list[int],
                       p: float | None = None) -> None:
    """Record which rows of the mix are harmful (for the run folder): JSON {n, p, harmful_indices, harmful_prompts}.

    p defaults to the realised fraction len(harmful_idx) / len(rows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "n": len(rows),
        "p": p if p is not None else (len(harmful_idx) / len(rows) if rows else 0.0),
        "harmful_indices": list(harmful_idx),
        "harmful_prompts": [rows[i].prompt for i in harmful_idx],
    }
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
