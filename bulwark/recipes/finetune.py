"""`bulwark finetune`: fine-tune an aligned model on a user upload with p*n harmful rows hidden in it.

    python -m bulwark.recipes.finetune CONFIG [key=value ...] [--resume] [--overwrite]

With defense.name=sft this is the harmful fine-tuning attack; other defenses change the loop through
their hooks. The run folder records which rows of the upload were harmful (attack_mix.json).
"""

from __future__ import annotations

from bulwark.config import Config
from bulwark.defenses import Defense
from bulwark.recipes.loop import StagePlan, prepare_stage, run_stage
from bulwark.recipes.streams import alignment_rows, attack_mix, harmful_rows, mix_writer


def build_plan(cfg: Config, defense: Defense) -> StagePlan:
    rows, harmful_idx = attack_mix(cfg)
    streams = {"main": rows}
    if "align" in defense.side_streams:
        streams["align"] = alignment_rows(cfg)
    if "harmful" in defense.side_streams:
        streams["harmful"] = harmful_rows(cfg, cfg.data.align_n)
    return StagePlan(streams, writers={"attack_mix.json": mix_writer(rows, harmful_idx, cfg.data.p)})


def prepare(config: str | None, overrides: list[str], **flags: object) -> tuple[int, list[str]]:
    """The launcher's checks before any rank starts (bulwark/launch.py); returns (ranks, rank argv)."""
    return prepare_stage("finetune", build_plan, config, overrides, **flags)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    run_stage("finetune", argv, build_plan)


if __name__ == "__main__":
    main()
