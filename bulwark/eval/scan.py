"""`bulwark scan DATA`: screen an uploaded fine-tuning file before training on it (a data-filter defense).

A judge reads every (prompt, response) row; the scan reports the flagged fraction and the flagged rows'
line numbers (1-based: the JSONL line, or the item of a JSON list), and optionally writes a filtered copy
without them (the original rows, atomically replaced).

Which judges: the question for an upload is "is this row harmful content?", so the scan takes a
content judge: `moderation` (default) or `hf:<path>`. The refusal-style judges (`refusal`, `keyword`)
answer "did the answer refuse?": on an upload of ordinary task data they would flag every helpful row,
so the scan refuses them with an error saying why.

The format is guessed from the file name (sst2_*, alpaca*, beavertails_* ...) or from its keys
(prompt/response -> qa, instruction/output -> alpaca, sentence/label -> sst2, text/label -> agnews,
question/answer -> gsm8k), or given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bulwark.errors import BulwarkInputError
from bulwark.eval.io import atomic_write_jsonl

SCAN_JUDGES = ("moderation", "hf:<path>")
_KEY_FORMATS: list[tuple[tuple[str, ...], str]] = [
    (("prompt", "response"), "qa"),
    (("instruction", "output"), "alpaca"),
    (("sentence", "label"), "sst2"),
    (("text", "label"), "agnews"),
    (("question", "answer"), "gsm8k"),
]


def sniff_format(path: str, rows: list[dict]) -> str:
    """The data format of a file: from its name if known, else from the keys of its first row."""
    from bulwark.data.formats import guess_format

    try:
        return guess_format(path)
    except BulwarkInputError:
        pass
    keys = set(rows[0])
    for needed, fmt in _KEY_FORMATS:
        if set(needed) <= keys:
            return fmt
    shown = ", ".join(sorted(k for k in keys if k != "__line__"))
    raise BulwarkInputError(
        f"{path}: cannot tell the data format from its keys ({shown}); pass --format qa|alpaca|sst2|agnews|gsm8k"
    )


def scan_file(
    path: str | Path,
    judge: str = "moderation",
    out_filtered: Path | None = None,
    fmt: str | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Judge every row of `path`; returns {n_rows, n_flagged, flagged_fraction, flagged_lines, ...}."""
    from bulwark.data.formats import FORMATS
    from bulwark.data.readers import LINE_KEY, find_file, read_rows
    from bulwark.eval.judges import check_judge_name, get_judge

    started = time.time()
    check_judge_name(judge)
    if judge in ("refusal", "keyword"):
        raise BulwarkInputError(
            f"scan judge '{judge}' asks whether an answer refused, which flags every helpful row of an upload; "
            f"use one of: {', '.join(SCAN_JUDGES)}"
        )
    source = str(path)
    rows = read_rows(source, data_dir)
    where = str(find_file(source, data_dir))
    fmt = fmt or sniff_format(where, rows)
    if fmt not in FORMATS or fmt == "prompt_only":
        raise BulwarkInputError(f"scan format '{fmt}': choose one of qa, alpaca, sst2, agnews, gsm8k")
    examples = [FORMATS[fmt](row, where) for row in rows]
    prompts = [e.prompt + ("\n\n" + e.input if e.input else "") for e in examples]

    scorer = get_judge(judge, data_dir)
    log(f"scan: judging {len(rows)} rows of {where} (format {fmt}) with '{judge}'")
    verdicts = scorer.judge(prompts, [e.response for e in examples])
    flagged_lines = [row[LINE_KEY] for row, v in zip(rows, verdicts, strict=True) if v.harmful]

    report = {
        "file": where,
        "format": fmt,
        "judge": judge,
        "n_rows": len(rows),
        "n_flagged": len(flagged_lines),
        "flagged_fraction": len(flagged_lines) / len(rows),
        "flagged_lines": flagged_lines,
        "filtered": None,
        "seconds": round(time.time() - started, 1),
    }
    if out_filtered is not None:
        kept = [{k: v for k, v in row.items() if k != LINE_KEY}
                for row, v in zip(rows, verdicts, strict=True) if not v.harmful]
        atomic_write_jsonl(Path(out_filtered).expanduser(), kept)
        report["filtered"] = str(out_filtered)
    shown = ", ".join(map(str, flagged_lines[:20])) + (" ..." if len(flagged_lines) > 20 else "")
    log(f"scan: {len(flagged_lines)}/{len(rows)} rows flagged ({100 * report['flagged_fraction']:.1f}%)"
        + (f"; lines {shown}" if flagged_lines else "")
        + (f"; filtered copy -> {out_filtered}" if out_filtered is not None else ""))
    return report
