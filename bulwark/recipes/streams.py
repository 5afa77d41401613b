"""Which rows feed which stream: the alignment set, the harmful set and the user's attacked upload."""

from __future__ import annotations

import random
from pathlib import Path

from bulwark.config import Config
from bulwark.data import Example, build_attack_mix, load_examples, resolve_data_dir, write_mix_manifest
from bulwark.errors import BulwarkInputError


def sample(rows: list[Example], k: int, seed: int, what: str) -> list[Example]:
    if k > len(rows):
        raise BulwarkInputError(f"{what}: asked for {k} rows but the source has {len(rows)}")
    return random.Random(seed).sample(rows, k)


def alignment_rows(cfg: Config) -> list[Example]:
    """Harmful prompts with refusals, plus `align_benign_n` benign instructions answered helpfully,
    shuffled together. Only answers that really refuse are kept by default: about a quarter of
    BeaverTails' "safe" answers comply harmlessly, which teaches no refusal."""
    from bulwark.eval.judge_data import has_gcg_phrase

    data_dir = resolve_data_dir(cfg.data.dir)
    rows = load_examples(cfg.data.align, None, data_dir)
    if cfg.data.align_refusals_only:
        rows = [ex for ex in rows if has_gcg_phrase(ex.response)]
    chosen = sample(rows, cfg.data.align_n, cfg.data.seed, f"data.align_n ({cfg.data.align})")
    if cfg.data.align_benign_n:
        benign = load_examples(cfg.data.align_benign, None, data_dir)
        chosen += sample(benign, cfg.data.align_benign_n, cfg.data.seed + 2,
                         f"data.align_benign_n ({cfg.data.align_benign})")
        random.Random(cfg.data.seed + 3).shuffle(chosen)
    return chosen


def harmful_rows(cfg: Config, k: int) -> list[Example]:
    rows = load_examples(cfg.data.harmful, None, resolve_data_dir(cfg.data.dir), harmful=True)
    return sample(rows, k, cfg.data.seed + 1, f"data.harmful ({cfg.data.harmful})")


def attack_mix(cfg: Config) -> tuple[list[Example], list[int]]:
    data_dir = resolve_data_dir(cfg.data.dir)
    user = load_examples(cfg.data.user, cfg.data.user_format, data_dir)
    harmful = load_examples(cfg.data.harmful, None, data_dir, harmful=True)
    return build_attack_mix(user, harmful, cfg.data.n, cfg.data.p, cfg.data.seed)


def mix_writer(rows: list[Example], harmful_idx: list[int], p: float):
    return lambda path: write_mix_manifest(Path(path), rows, harmful_idx, p=p)
