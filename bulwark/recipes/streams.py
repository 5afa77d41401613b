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


def refusal_rows(cfg: Config) -> list[Example]:
    """`align_n` harmful prompts with refusals. Only answers that really refuse are kept by default:
    about a quarter of BeaverTails' "safe" answers comply harmlessly, which teaches no refusal."""
    from bulwark.eval.judge_data import has_gcg_phrase

    rows = load_examples(cfg.data.align, None, resolve_data_dir(cfg.data.dir))
    if cfg.data.align_refusals_only:
        rows = [ex for ex in rows if has_gcg_phrase(ex.response)]
    return sample(rows, cfg.data.align_n, cfg.data.seed, f"data.align_n ({cfg.data.align})")


def benign_rows(cfg: Config) -> list[Example]:
    """`align_benign_n` benign instructions answered helpfully (none when it is 0)."""
    if not cfg.data.align_benign_n:
        return []
    benign = load_examples(cfg.data.align_benign, None, resolve_data_dir(cfg.data.dir))
    return sample(benign, cfg.data.align_benign_n, cfg.data.seed + 2, f"data.align_benign_n ({cfg.data.align_benign})")


def mix_alignment(cfg: Config, refusals: list[Example], benign: list[Example]) -> list[Example]:
    """The refusal rows plus the benign rows, shuffled together (new list; the inputs are untouched)."""
    chosen = refusals + benign
    if benign:
        random.Random(cfg.data.seed + 3).shuffle(chosen)
    return chosen


def alignment_rows(cfg: Config) -> list[Example]:
    """The alignment mix read from the configured files (fine-tuning's alignment stream)."""
    return mix_alignment(cfg, refusal_rows(cfg), benign_rows(cfg))


def benign_refusal_rows(cfg: Config, refusals: list[Example], benign: list[Example], words: int = 12) -> list[Example]:
    """Each benign prompt of the alignment set with the opening (first `words` words) of a refusal
    drawn from it: the negatives of `refusal_ul`. Short, since only the first tokens are scored.
    Takes the rows `refusal_rows` / `benign_rows` gave the main stream, so the files are read once."""
    if not benign:
        raise BulwarkInputError("defense refusal_ul needs benign prompts: set data.align_benign_n > 0")
    pick = random.Random(cfg.data.seed + 4)
    return [Example(ex.prompt, " ".join(pick.choice(refusals).response.split()[:words]), source=ex.source,
                    input=ex.input) for ex in benign]


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
