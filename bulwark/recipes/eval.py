"""`bulwark eval` as a launcher stage: multi-rank generation (and ZeRO-3 partitioned eval) starts here.

    python -m bulwark.recipes.eval [EVAL_YAML] [key=value ...] [--overwrite] [--resume-if-present]

The keys are `bulwark.eval.run.run_eval`'s options (out_dir, judge, task, n_prompts, dtype, partition, ...)
plus `model` and `nproc`; `meta.KEY=VALUE` sets one field of the summary key. An eval YAML holds the same
keys. `bulwark eval MODEL --option ...` builds these overrides from its options and goes through
`bulwark.launch.start` when it needs ranks (nproc > 1 or partition zero3); one plain rank runs in the CLI's
own process. With --resume-if-present (SLURM jobs), an eval whose summary.json exists is not run again.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

from bulwark.errors import BulwarkInputError
from bulwark.recipes.loop import parse_args


def eval_options() -> set[str]:
    """run_eval's keyword options (out_dir, judge, task, ...)."""
    from bulwark.eval.run import run_eval

    params = inspect.signature(run_eval).parameters
    return {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"log"}


def read_eval_yaml(path: Path) -> dict[str, Any]:
    """An eval YAML: `model:` plus any run_eval option (out_dir, judge, task, meta, ...) and `nproc`."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BulwarkInputError(f"{path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise BulwarkInputError(f"{path}: expected a mapping of options (model: ..., out_dir: ...)")
    return _checked({k.replace("-", "_"): v for k, v in data.items()}, str(path))


def _checked(options: dict[str, Any], where: str) -> dict[str, Any]:
    allowed = {"model", "nproc", *eval_options()}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BulwarkInputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return options


def resolve(config: str | None, overrides: list[str]) -> tuple[str, dict[str, Any], int]:
    """(model, run_eval options, ranks) from an eval YAML and key=value overrides."""
    from bulwark.config import check_numbers, parse_overrides
    from bulwark.eval.device import check_partition, resolve_dtype

    options = read_eval_yaml(Path(config)) if config else {}
    given = parse_overrides(overrides)
    meta = {**(options.pop("meta", None) or {}), **(given.pop("meta", None) or {})}
    options.update(_checked(given, "eval override"))
    if "model" not in options:
        raise BulwarkInputError("eval: give the model to evaluate (model: in the eval YAML, or model=FOLDER)")
    model = str(options.pop("model"))
    nproc = int(options.pop("nproc", 1) or 1)
    if nproc < 1:
        raise BulwarkInputError(f"nproc = {nproc} must be at least 1")
    options["meta"] = meta
    check_numbers({k: v for k, v in options.items() if k != "meta"})
    for key in ("n_prompts", "n_task", "n_benign", "max_new_tokens", "batch_size"):
        if options.get(key) is not None and int(options[key]) < 1:
            raise BulwarkInputError(f"eval: {key} = {options[key]} must be at least 1")
    options.setdefault("out_dir", str(Path(model) / "eval"))
    resolve_dtype(options.get("dtype"))  # bad values fail here, before any process starts
    options["partition"] = check_partition(options.get("partition"))
    return model, options, nproc


def as_overrides(model: str, options: dict[str, Any], nproc: int) -> list[str]:
    """The key=value overrides that `resolve` turns back into (model, options, nproc)."""
    out = [f"model={model}", f"nproc={nproc}"]
    for key, value in options.items():
        if key == "meta":
            out += [f"meta.{k}={v}" for k, v in (value or {}).items()]
        elif value is not None:
            out.append(f"{key}={value}")
    return out


def prepare(config: str | None, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
            resume_if_present: bool = False, stop_after: int = 0) -> tuple[int, list[str]]:
    """The launcher's checks before any rank starts (bulwark/launch.py); returns (ranks, rank argv)."""
    from bulwark.eval.generate import check_model_path
    from bulwark.launch import stage_argv

    if resume or stop_after:
        raise BulwarkInputError("eval keeps no checkpoints: --resume / --stop-after do not apply")
    import yaml

    model, options, nproc = resolve(config, overrides)
    check_model_path(model)
    # the ranks read what was resolved here (every option, defaults included), not the strings again
    resolved = yaml.safe_dump({"model": model, "nproc": nproc, **options}, sort_keys=False)
    return nproc, stage_argv(config, overrides, overwrite=overwrite, resume_if_present=resume_if_present,
                             resolved=resolved)


def main(argv: list[str] | None = None) -> None:
    """The rank entry: every rank evaluates its share (bulwark/eval/generate.py); rank 0 writes out_dir."""
    from bulwark.eval.generate import init_from_env, shutdown
    from bulwark.eval.run import _log, run_eval

    args = parse_args(argv, "eval")
    try:
        if args.resume or args.stop_after:
            raise BulwarkInputError("eval keeps no checkpoints: --resume / --stop-after do not apply")
        model, options, _ = resolve(args.config, args.overrides)
        if args.resume_if_present and (Path(options["out_dir"]) / "summary.json").is_file():
            print(f"{options['out_dir']}: this eval finished already (summary.json); nothing to do", file=sys.stderr)
            return
        rank, _ = init_from_env(options["partition"])
        run_eval(model, **options, log=_log if rank == 0 else (lambda _m: None))
    except BulwarkInputError as exc:
        from bulwark.errors import report

        report(f"error: {exc}", os.environ.get("RANK", "0") == "0")
        shutdown()
        raise SystemExit(2) from None
    except BaseException:
        shutdown()
        raise
    if options["partition"] == "zero3":
        # DeepSpeed keeps process groups of its own whose gloo threads can abort a finished process at
        # interpreter exit (bulwark.engine.dist.exit_after_success): leave at once, exit code 0.
        from bulwark.engine.dist import exit_after_success

        exit_after_success()
    shutdown()


if __name__ == "__main__":
    main()
