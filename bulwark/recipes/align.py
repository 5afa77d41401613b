"""`bulwark align`: safety alignment of the base model on refusal data, under an alignment defense.

    python -m bulwark.recipes.align CONFIG [key=value ...] [--resume] [--overwrite]
"""

from __future__ import annotations

from bulwark.config import Config
from bulwark.defenses import Defense
from bulwark.recipes.loop import StagePlan, prepare_stage, run_stage
from bulwark.recipes.streams import (
    benign_refusal_rows,
    benign_rows,
    harmful_rows,
    mix_alignment,
    refusal_rows,
)


def build_plan(cfg: Config, defense: Defense) -> StagePlan:
    refusals, benign = refusal_rows(cfg), benign_rows(cfg)
    streams = {"main": mix_alignment(cfg, refusals, benign)}
    if "harmful" in defense.side_streams:
        streams["harmful"] = harmful_rows(cfg, cfg.data.align_n)
    if "align" in defense.side_streams:
        streams["align"] = streams["main"]
    if "benign_refusals" in defense.side_streams:
        streams["benign_refusals"] = benign_refusal_rows(cfg, refusals, benign)
    return StagePlan(streams)


def prepare(config: str | None, overrides: list[str], **flags: object) -> tuple[int, list[str]]:
    """The launcher's checks before any rank starts (bulwark/launch.py); returns (ranks, rank argv)."""
    return prepare_stage("align", build_plan, config, overrides, **flags)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    run_stage("align", argv, build_plan)


if __name__ == "__main__":
    main()
