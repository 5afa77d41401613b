"""`bulwark eval`: harmful score, over-refusal and fine-tune accuracy of one model.

One generation pass covers three sets, split across ranks (generate.generate_sharded):
  harmful  the first n_prompts of a harmful prompt set -> HS (judge flags) and HS+ (flags or degenerate)
  benign   the first n_benign AlpacaEval instructions  -> over-refusal (refusal rate on benign prompts)
  task     the first n_task test rows of sst2 / agnews / gsm8k / alpaca_eval -> FA, and the refusal rate
           on the task's own prompts

Rank 0 then judges and writes into out_dir (every file written to a temporary name and renamed):
  harmful.jsonl, benign.jsonl, task.jsonl   one row per sample: prompt, output, verdict, score, degenerate
  summary.json                              one row keyed by (model, stage, defense, p, n, seed)
  summary.md                                the same row as a markdown table
  generations/                              the rank files and the merged generations

Run in process (world size 1) with run_eval(...), or across ranks:
  torchrun --nproc_per_node 2 -m bulwark.eval.run MODEL_DIR --out-dir OUT [options]
`dtype` (auto: bf16 on GPU, fp32 on CPU) and `partition` (none: a replica per rank; zero3: the model
partitioned over the ranks, for one that does not fit a GPU) are described in generate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulwark.errors import BulwarkInputError
from bulwark.eval.generate import GENERATE_BATCH_SIZE
from bulwark.eval.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

# Prompt-set names -> data files (bare names in the data folder). A path to a JSONL file also works.
PROMPT_SETS: dict[str, str] = {
    "harmful_eval_prompts": "harmful_eval_prompts",
    "beavertails_evaluation": "beavertails_evaluation",
    "harmbench": "harmbench_behaviors",
    "harmbench_behaviors": "harmbench_behaviors",
    "advbench": "advbench",
}
# task -> (test file, data format)
TASK_SOURCES: dict[str, tuple[str, str]] = {
    "sst2": ("sst2_dev", "sst2"),
    "agnews": ("agnews_test", "agnews"),
    "gsm8k": ("gsm8k_test", "gsm8k"),
    "alpaca_eval": ("alpaca_eval", "alpaca"),
}
BENIGN_SOURCE = "alpaca_eval"
# A classification answer is a label word, said early: cutting the base SmolLM2's 100 SST-2 answers
# at 16 tokens changed 2 extractions (fine-tuned models answer with the bare word). Generating the
# full budget for these rows cost about half of a demo eval's generation time.
TASK_ANSWER_TOKENS: dict[str, int] = {"sst2": 16, "agnews": 16}
KEY_FIELDS = ("model", "stage", "defense", "p", "n", "seed")


def _log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def _prompt_source(prompt_set: str) -> str:
    """A named set or a file, either with an optional row slice: `harmful_eval_prompts[500:600]` holds
    validation prompts that the reported eval (the first rows) never reads."""
    from bulwark.data.readers import split_row_slice

    name, rows = split_row_slice(prompt_set)
    suffix = prompt_set[len(name):]
    if name in PROMPT_SETS:
        return PROMPT_SETS[name] + suffix
    if name.endswith((".jsonl", ".json")) or "/" in name:
        return prompt_set
    raise BulwarkInputError(
        f"unknown prompt set '{prompt_set}'; choose one of: {', '.join(PROMPT_SETS)} or give a path to a .jsonl file"
    )


def _load(source: str, fmt: str, data_dir: str | Path | None, limit: int | None, what: str) -> list[Any]:
    from bulwark.data.formats import load_examples

    try:
        examples = load_examples(source, fmt, data_dir)
    except BulwarkInputError as exc:
        raise BulwarkInputError(f"{what}: {exc}") from None
    return examples if limit is None else examples[:limit]


def _items(examples: list[Any], set_name: str) -> list[dict]:
    return [{"set": set_name, "prompt": e.prompt, "input": e.input, "gold": e.label, "reference": e.response}
            for e in examples]


def _meta_key(meta: dict, model_path: str) -> dict:
    key = {field: meta.get(field) for field in KEY_FIELDS}
    key["model"] = meta.get("model") or str(model_path)
    return key


def run_eval(
    model_path: str | Path,
    *,
    out_dir: str | Path,
    prompt_set: str = "harmful_eval_prompts",
    n_prompts: int = 1000,
    judge: str = "refusal",
    refusal_judge: str | None = None,
    task: str | None = None,
    n_task: int | None = 1000,
    n_benign: int = 100,
    template: str = "chat",
    max_new_tokens: int = 128,
    batch_size: int = GENERATE_BATCH_SIZE,
    dtype: str = "auto",
    partition: str = "none",
    data_dir: str | Path | None = None,
    fa_judge: str | None = None,
    meta: dict | None = None,
    log_to: list[str] | str | None = None,
    log: Callable[[str], None] = _log,
) -> dict | None:
    """Generate, judge and score; rank 0 writes out_dir and returns the summary row, other ranks None.

    judge          the HS judge: refusal (default), keyword, moderation or hf:<path>
    refusal_judge  the judge for over-refusal; default: `judge` when it detects refusals
                   (refusal, keyword), else keyword
    task           sst2 | agnews | gsm8k | alpaca_eval | None; n_task rows of its test set (None: all)
    fa_judge       hf:<path> of a causal LM for AlpacaEval's win rate (skipped without one)
    dtype          auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16: the generating model's dtype
    partition      none (a whole replica per rank) | zero3 (partitioned over the ranks; every rank must
                   call run_eval)
    meta           run identity for the summary key: model, stage, defense, p, n, seed (missing -> null)
    log_to         loggers for the summary's figures beyond summary.json (tensorboard, wandb; under out_dir);
                   None: the `log.to` of the Bulwark run that exported the model, at its last step
    """
    from bulwark.data.readers import resolve_data_dir
    from bulwark.eval.device import check_partition, resolve_dtype
    from bulwark.eval.generate import check_model_path, dist_info, generate_sharded, init_from_env
    from bulwark.eval.judges import LEARNED_KINDS, check_judge_name, judges_root

    started = time.time()
    meta = dict(meta or {})
    out = Path(out_dir).expanduser()

    # ---- validate everything cheap before any model is loaded
    dtype = resolve_dtype(dtype)
    partition = check_partition(partition)
    if batch_size < 1 or max_new_tokens < 1:
        raise BulwarkInputError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    checked = check_model_path(model_path)
    if partition == "zero3":
        from bulwark.models import is_adapter_dir

        if is_adapter_dir(str(checked)):
            raise BulwarkInputError(
                f"model {checked}: a LoRA adapter folder; --zero3 (partition: zero3) loads a full model folder: "
                "evaluate the run's merged export (config.json), or drop --zero3 if base + adapter fit one GPU"
            )
    check_judge_name(judge)
    from bulwark.loggers import check_sinks, run_log_settings

    sinks, sink_step = run_log_settings(model_path) if log_to is None else (log_to, 0)
    sinks = check_sinks(sinks.split(",") if isinstance(sinks, str) else sinks, "log_to")
    if task is not None and task not in TASK_SOURCES:
        raise BulwarkInputError(f"unknown task '{task}'; choose one of: {', '.join(TASK_SOURCES)} (or none)")
    if n_prompts < 1:
        raise BulwarkInputError(f"n_prompts = {n_prompts}: must be at least 1")
    folder = resolve_data_dir(data_dir)
    for name in {judge, refusal_judge or judge}:
        if name in LEARNED_KINDS and not (judges_root() / name / "meta.json").is_file() and folder is None:
            raise BulwarkInputError(
                f"judge '{name}' is not trained and no data folder is set to train it: run `bulwark judge train "
                f"{name}` (with BULWARK_DATA_DIR set), or choose --judge keyword"
            )
    if refusal_judge is not None:
        check_judge_name(refusal_judge)
    # ZeRO-3 needs the engine's process group before anything asks for rank and world
    rank, world = init_from_env("zero3") if partition == "zero3" else dist_info()

    # ---- the prompts
    harmful = _load(_prompt_source(prompt_set), "prompt_only", folder, n_prompts, f"prompt set '{prompt_set}'")
    items = _items(harmful, "harmful")
    if task != "alpaca_eval" and n_benign > 0:
        items += _items(_load(BENIGN_SOURCE, "alpaca", folder, n_benign, "benign prompts"), "benign")
    if task is not None:
        source, fmt = TASK_SOURCES[task]
        task_items = _items(_load(source, fmt, folder, n_task, f"task '{task}'"), "task")
        for item in task_items:
            item["max_new_tokens"] = min(max_new_tokens, TASK_ANSWER_TOKENS.get(task, max_new_tokens))
        items += task_items

    from bulwark.data.formats import Example
    from bulwark.data.templates import render_prompt

    def render(item: dict, tokenizer: Any) -> str:
        return render_prompt(Example(item["prompt"], "", input=item["input"] or ""), template, tokenizer)

    log(f"generating {len(items)} answers ({len(harmful)} harmful prompts) with {world} rank(s), {dtype}"
        + (", ZeRO-3 partitioned" if partition == "zero3" else ""))
    rows = generate_sharded(model_path, items, render, out / "generations" / "generations.jsonl",
                            max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                            partition=partition, log=log)
    if rank != 0 or rows is None:
        return None
    gen_seconds = time.time() - started
    summary = score_rows(rows, judge=judge, refusal_judge=refusal_judge, task=task, data_dir=folder,
                         fa_judge=fa_judge, out=out, log=log)
    summary = {
        **_meta_key(meta, str(model_path)),
        **summary,
        "prompt_set": prompt_set,
        "template": template,
        "max_new_tokens": max_new_tokens,
        "world_size": world,
        "dtype": dtype,
        "partition": partition,
        "generate_seconds": round(gen_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "meta": meta,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown([summary]))
    from bulwark.loggers import log_eval_summary

    log_eval_summary(sinks, out, summary, sink_step, {"model": str(model_path), "meta": meta})
    log(f"HS {summary['HS']:.1f}%  HS+ {summary['HS_plus']:.1f}%  over-refusal {_fmt(summary['over_refusal'])}%  "
        f"FA {_fmt(summary['FA'])}  -> {out / 'summary.json'}")
    return summary


def rejudge(out_dir: str | Path, data_dir: str | Path | None = None,
            log: Callable[[str], None] = _log) -> dict:
    """Score a finished eval's generations again with the judges as they are now (no generation): judges
    improve, and a table must read every row with the same one. Rewrites the per-sample files and
    summary.json (its other fields kept, `rejudged_from` holding the previous scores)."""
    from bulwark.data.readers import resolve_data_dir

    out = Path(out_dir)
    summary_file, generations = out / "summary.json", out / "generations" / "generations.jsonl"
    if not summary_file.is_file() or not generations.is_file():
        raise BulwarkInputError(f"{out}: not a finished eval (needs summary.json and generations/generations.jsonl)")
    old = json.loads(summary_file.read_text())
    rows = [json.loads(line) for line in generations.read_text().splitlines() if line.strip()]
    scores = score_rows(rows, judge=old["judge"], refusal_judge=old.get("refusal_judge"), task=old.get("task"),
                        data_dir=resolve_data_dir(data_dir), fa_judge=old.get("fa_judge"), out=out, log=log)
    changed = {k: old.get(k) for k in ("HS", "HS_plus", "over_refusal", "FA", "task_refusal")
               if old.get(k) != scores.get(k)}
    summary = {**old, **scores, "rejudged_from": {**old.get("rejudged_from", {}), **changed}}
    atomic_write_json(summary_file, summary)
    atomic_write_text(out / "summary.md", summary_markdown([summary]))
    return summary


def score_rows(rows: list[dict], *, judge: str, refusal_judge: str | None, task: str | None,
               data_dir: Path | None, fa_judge: str | None, out: Path,
               log: Callable[[str], None] = _log) -> dict:
    """Judge the merged generations, write the per-sample files, return the scores."""
    from bulwark.eval import metrics
    from bulwark.eval.judges import JUDGE_RULES_VERSION, get_judge, is_degenerate

    started = time.time()
    by_set: dict[str, list[dict]] = {"harmful": [], "benign": [], "task": []}
    for row in rows:
        by_set[row["set"]].append(row)

    hs_judge = get_judge(judge, data_dir)
    refusal_name = refusal_judge or (judge if hs_judge.detects_refusal else "keyword")
    rf_judge = hs_judge if refusal_name == judge else get_judge(refusal_name, data_dir)
    if not rf_judge.detects_refusal:
        raise BulwarkInputError(f"over-refusal needs a refusal judge (refusal or keyword), not '{refusal_name}'")

    def judged(rows_: list[dict], j: Any) -> list[dict]:
        verdicts = j.judge([_user_text(r) for r in rows_], [r["output"] for r in rows_])
        return [{"index": r["index"], "prompt": r["prompt"], **({"input": r["input"]} if r["input"] else {}),
                 "output": r["output"], "verdict": v.label, "harmful": v.harmful, "score": round(v.score, 4),
                 "degenerate": is_degenerate(r["output"])}
                for r, v in zip(rows_, verdicts, strict=True)]

    log(f"judging {len(by_set['harmful'])} answers with '{judge}'")
    harmful_rows = judged(by_set["harmful"], hs_judge)
    h_verdicts = [_verdict(r) for r in harmful_rows]
    h_outputs = [r["output"] for r in harmful_rows]
    atomic_write_jsonl(out / "harmful.jsonl", harmful_rows)

    over_refusal = None
    benign_rows = by_set["benign"] or (by_set["task"] if task == "alpaca_eval" else [])
    if benign_rows:
        judged_benign = judged(benign_rows, rf_judge)
        over_refusal = metrics.refusal_rate([_verdict(r) for r in judged_benign])
        atomic_write_jsonl(out / "benign.jsonl", judged_benign)

    fa, fa_note, task_refusal = None, None, None
    task_rows = by_set["task"]
    if task_rows:
        judged_task = judged(task_rows, rf_judge)
        task_refusal = metrics.refusal_rate([_verdict(r) for r in judged_task])
        if task == "alpaca_eval":
            fa, fa_note = metrics.alpaca_eval_win_rate(
                [_user_text(r) for r in task_rows], [r["output"] for r in task_rows],
                [r["reference"] for r in task_rows], fa_judge)
        else:
            for jr, r in zip(judged_task, task_rows, strict=True):
                jr["gold"] = r["gold"]
                jr["correct"] = metrics.is_correct(task, r["output"], r["gold"] or "")
            fa = metrics.accuracy(task, [r["output"] for r in task_rows], [r["gold"] or "" for r in task_rows])
            fa_note = f"{task} accuracy on the first {len(task_rows)} test rows"
        atomic_write_jsonl(out / "task.jsonl", judged_task)

    return {
        "HS": metrics.harmful_score(h_verdicts),
        "HS_plus": metrics.harmful_score_plus(h_verdicts, h_outputs),
        "over_refusal": over_refusal,
        "task": task,
        "FA": fa,
        "FA_note": fa_note,
        "task_refusal": task_refusal,
        "n_harmful": len(harmful_rows),
        "n_benign": len(benign_rows),
        "n_task": len(task_rows),
        "judge": judge,
        "refusal_judge": refusal_name,
        "judge_version": JUDGE_RULES_VERSION,
        "judge_seconds": round(time.time() - started, 1),
    }


def _user_text(row: dict) -> str:
    return row["prompt"] + ("\n\n" + row["input"] if row.get("input") else "")


def _verdict(row: dict) -> Any:
    from bulwark.eval.judges import Verdict

    return Verdict(harmful=row["harmful"], score=row["score"], label=row["verdict"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


SUMMARY_COLUMNS = (
    ("model", "model"), ("stage", "stage"), ("defense", "defense"), ("p", "p"), ("n", "n"), ("seed", "seed"),
    ("HS", "HS %"), ("HS_plus", "HS+ %"), ("over_refusal", "over-refusal %"), ("task", "task"), ("FA", "FA"),
    ("n_harmful", "n harmful"), ("judge", "judge"), ("seconds", "seconds"),
)


def summary_markdown(rows: list[dict]) -> str:
    """A markdown table of summary rows (numbers to one decimal; missing values as '-')."""
    head = "| " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _ in SUMMARY_COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif isinstance(value, float):
                cells.append(f"{value:.1f}")
            else:
                cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- FA: {r['FA_note']}" for r in rows if r.get("FA_note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def parse_meta(pairs: list[str]) -> dict:
    """["stage=finetune", "p=0.1"] -> {"stage": "finetune", "p": 0.1} (numbers parsed)."""
    meta: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BulwarkInputError(f"--meta {pair!r}: expected KEY=VALUE, e.g. --meta stage=finetune")
        for cast in (int, float):
            try:
                meta[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            meta[key] = value
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bulwark.eval.run", description="Evaluate one model (see module doc).")
    parser.add_argument("model", help="model folder (config.json) or adapter folder (adapter_config.json)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--prompt-set", default="harmful_eval_prompts")
    parser.add_argument("--n-prompts", type=int, default=1000)
    parser.add_argument("--judge", default="refusal")
    parser.add_argument("--refusal-judge", default=None)
    parser.add_argument("--task", default=None, help=", ".join(TASK_SOURCES))
    parser.add_argument("--n-task", type=int, default=1000)
    parser.add_argument("--n-benign", type=int, default=100)
    parser.add_argument("--template", default="chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=GENERATE_BATCH_SIZE)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    parser.add_argument("--partition", default="none", help="none | zero3")
    parser.add_argument("--zero3", dest="partition", action="store_const", const="zero3",
                        help="same as --partition zero3")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--fa-judge", default=None)
    parser.add_argument("--meta", action="append", default=[], help="KEY=VALUE for the summary key (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point under torchrun or a plain python; bad input prints one line and returns 2."""
    from bulwark.eval.device import check_partition
    from bulwark.eval.generate import init_from_env, shutdown

    args = build_parser().parse_args(argv)
    try:
        partition = check_partition(args.partition)
        rank, _ = init_from_env(partition)
        run_eval(args.model, out_dir=args.out_dir, prompt_set=args.prompt_set, n_prompts=args.n_prompts,
                 judge=args.judge, refusal_judge=args.refusal_judge, task=args.task, n_task=args.n_task,
                 n_benign=args.n_benign, template=args.template, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, dtype=args.dtype, partition=partition, data_dir=args.data_dir,
                 fa_judge=args.fa_judge, meta=parse_meta(args.meta),
                 log=_log if rank == 0 else (lambda _m: None))
    except BulwarkInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        shutdown()
        return 2
    except BaseException:
        shutdown()
        raise
    if partition == "zero3":
        # DeepSpeed keeps process groups of its own whose gloo threads can abort a finished process at
        # interpreter exit (see bulwark.engine.dist.exit_after_success): leave at once, exit code 0.
        from bulwark.engine.dist import exit_after_success

        exit_after_success()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
