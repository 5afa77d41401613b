"""The standard data sets (`bulwark data list` / `bulwark data fetch`): where each comes from on the Hugging
Face hub, its licence, and how one hub row becomes one row of the JSONL file Bulwark reads.

`fetch` writes `<name>.jsonl` into the data folder (the same keys as the curated files the demo, bench and eval
read: see docs/DATA.md) and keeps a block of SOURCES.md naming each set's source and licence. It is
all-or-nothing: every set is converted into a temporary file first and the files are renamed into place only
when all of them succeeded, so a lost connection never leaves a half-written or half-updated folder.

The loader is injectable (`Loader`): `hub_loader` reads the hub, `disk_loader(DIR)` reads sets saved with
`datasets`' `save_to_disk` (`--from-disk DIR`), which is how the tests and an air-gapped cluster fetch.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulwark.errors import BulwarkInputError

Row = dict[str, Any]


@dataclass(frozen=True)
class DataSet:
    name: str  # the file it becomes: <name>.jsonl
    hub_id: str  # Hugging Face dataset id (or a builder such as "json" with data_files)
    split: str
    licence: str
    what: str
    convert: Callable[[Row], Row | None]  # one hub row -> one Bulwark row; None: the row is not in this set
    config: str | None = None
    data_files: str | None = None
    limit: int | None = None  # keep the first N converted rows (the size the papers and the curated files use)
    unique: str | None = None  # keep only the first row of each value of this key
    # a rule over the whole split (kept rows, every hub row) -> kept rows, for what one row cannot decide
    finish: Callable[[list[Row], list[Row]], list[Row]] | None = None

    @property
    def source(self) -> str:
        where = self.data_files or self.hub_id
        return f"{where}{f' ({self.config})' if self.config else ''} split {self.split}"


Loader = Callable[[DataSet], Iterable[Row]]


# ---- row converters -----------------------------------------------------------------------------------

def _beavertails_category(row: Row) -> str:
    # the hub keeps 14 harm flags; the curated files join the raised ones, in name order, with '|'
    flags = row.get("category") or {}
    return "|".join(sorted(k for k, v in flags.items() if v)) or "unknown"


def _bt_harmful(row: Row) -> Row | None:
    if row["is_safe"]:
        return None
    return {"prompt": row["prompt"], "response": row["response"], "category": _beavertails_category(row)}


def _bt_safe(row: Row) -> Row | None:
    return {"prompt": row["prompt"], "response": row["response"], "category": ""} if row["is_safe"] else None


def _bt_refusal(row: Row) -> Row | None:
    return {"prompt": row["prompt"], "response": row["response"]} if row["is_safe"] else None


def _bt_eval_prompt(row: Row) -> Row | None:
    return None if row["is_safe"] else {"prompt": row["prompt"], "category": _beavertails_category(row)}


def _safe_outside_eval(kept: list[Row], raw: list[Row]) -> list[Row]:
    # a 30k_test prompt with any unsafe answer is (or may become) a harmful-score prompt: a safe set trained
    # on it would leak the eval set into training
    unsafe = {r["prompt"] for r in raw if not r["is_safe"]}
    return [r for r in kept if r["prompt"] not in unsafe]


def _keys(*names: str, strip: tuple[str, ...] = ()) -> Callable[[Row], Row]:
    def convert(row: Row) -> Row:
        return {k: (row[k].strip() if k in strip else row[k]) for k in names}

    return convert


BT, BT_LICENCE = "PKU-Alignment/BeaverTails", "CC BY-NC 4.0"
CATALOG: dict[str, DataSet] = {d.name: d for d in [
    DataSet("beavertails_harmful", BT, "30k_train", BT_LICENCE,
            "unsafe QA pairs (is_safe=false): the attack's harmful rows", _bt_harmful, limit=5000),
    DataSet("beavertails_safe", BT, "30k_test", BT_LICENCE,
            "safe QA pairs whose prompt has no unsafe answer (outside the eval prompts)", _bt_safe,
            finish=_safe_outside_eval),
    DataSet("beavertails_refusals", BT, "30k_train", BT_LICENCE,
            "harmful prompt + safe answer: the alignment rows", _bt_refusal),
    DataSet("harmful_eval_prompts", BT, "30k_test", BT_LICENCE,
            "first 1000 unique unsafe prompts: the harmful-score set of Vaccine/Lisa/Booster", _bt_eval_prompt,
            unique="prompt", limit=1000),
    DataSet("beavertails_evaluation", "PKU-Alignment/BeaverTails-Evaluation", "test", "CC BY-NC 4.0",
            "700 evaluation prompts in 14 categories", _keys("prompt", "category")),
    DataSet("harmbench_behaviors", "walledai/HarmBench", "train", "MIT",
            "HarmBench standard text behaviors", _keys("prompt", "category"), config="standard"),
    DataSet("advbench", "walledai/AdvBench", "train", "MIT",
            "AdvBench harmful behaviors with target strings", _keys("prompt", "target")),
    DataSet("sst2_train", "stanfordnlp/sst2", "train", "GLUE SST-2: no explicit licence (research use)",
            "SST-2 sentiment (label 1 = positive)", _keys("sentence", "label", strip=("sentence",))),
    DataSet("sst2_dev", "stanfordnlp/sst2", "validation", "GLUE SST-2: no explicit licence (research use)",
            "SST-2 validation: the sst2 task's test rows", _keys("sentence", "label", strip=("sentence",))),
    DataSet("agnews_train", "fancyzhx/ag_news", "train", "AG News: non-commercial research use",
            "first 5000 AG News train rows (0 World, 1 Sports, 2 Business, 3 Sci/Tech)", _keys("text", "label"),
            limit=5000),
    DataSet("agnews_test", "fancyzhx/ag_news", "test", "AG News: non-commercial research use",
            "AG News test, full", _keys("text", "label")),
    DataSet("gsm8k_train", "openai/gsm8k", "train", "MIT", "GSM8K train; answers end with '#### N'",
            _keys("question", "answer"), config="main"),
    DataSet("gsm8k_test", "openai/gsm8k", "test", "MIT", "GSM8K test", _keys("question", "answer"), config="main"),
    DataSet("alpaca", "tatsu-lab/alpaca", "train", "CC BY-NC 4.0", "Alpaca instructions",
            _keys("instruction", "input", "output")),
    DataSet("alpaca_eval", "json", "train", "CC BY-NC 4.0 (data; code Apache-2.0)",
            "AlpacaEval's 805 instructions with reference outputs", _keys("instruction", "output"),
            data_files="hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json"),
]}


# ---- loaders ------------------------------------------------------------------------------------------

def offline() -> bool:
    from bulwark.data.readers import _offline

    return _offline()


def hub_loader(dataset: DataSet) -> Iterable[Row]:
    import datasets

    kwargs: dict[str, Any] = {"split": dataset.split}
    if dataset.data_files:
        kwargs["data_files"] = dataset.data_files
    return datasets.load_dataset(dataset.hub_id, dataset.config, **kwargs)


def disk_loader(root: str | Path) -> Loader:
    """Sets saved with `save_to_disk`: `ROOT/<set name>` (a Dataset) or `ROOT/<hub id>` (a Dataset, or a
    DatasetDict holding the set's split)."""
    root = Path(root).expanduser()

    def load(dataset: DataSet) -> Iterable[Row]:
        import datasets

        for folder in (root / dataset.name, root / dataset.hub_id):
            if folder.is_dir():
                loaded = datasets.load_from_disk(str(folder))
                if isinstance(loaded, datasets.DatasetDict):
                    if dataset.split not in loaded:
                        raise BulwarkInputError(f"{folder}: no split '{dataset.split}' (has {', '.join(loaded)})")
                    loaded = loaded[dataset.split]
                return loaded
        raise BulwarkInputError(f"--from-disk {root}: neither {dataset.name}/ nor {dataset.hub_id}/ is there "
                                "(save it with datasets' save_to_disk)")

    return load


# ---- fetch --------------------------------------------------------------------------------------------

def resolve_names(names: Iterable[str] | None) -> list[DataSet]:
    """The sets `names` asks for (every set when empty), in catalogue order; unknown names fail naming the closest."""
    names = [n.removesuffix(".jsonl") for n in (names or [])]
    for name in names:
        if name not in CATALOG:
            close = difflib.get_close_matches(name, CATALOG, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise BulwarkInputError(f"unknown data set '{name}'; {hint}`bulwark data list` shows the catalogue")
    return [d for d in CATALOG.values() if not names or d.name in names]


def convert_rows(dataset: DataSet, raw: Iterable[Row]) -> list[Row]:
    """The rows of `<name>.jsonl` from the hub rows of its split."""
    raw = [dict(r) for r in raw]
    kept: list[Row] = []
    seen: set[Any] = set()
    for row in raw:
        out = dataset.convert(row)
        if out is None:
            continue
        if dataset.unique is not None:
            if out[dataset.unique] in seen:
                continue
            seen.add(out[dataset.unique])
        kept.append(out)
    if dataset.finish is not None:
        kept = dataset.finish(kept, raw)
    return kept[:dataset.limit] if dataset.limit is not None else kept


def fetch_dir(given: str | Path | None) -> Path:
    """--dir, else $BULWARK_DATA_DIR, else the user cache: the folder the readers will look in."""
    from bulwark.data.readers import DATA_DIR_ENV, default_data_dir

    return Path(given or os.environ.get(DATA_DIR_ENV) or default_data_dir()).expanduser()


def fetch(names: Iterable[str] | None, dest: str | Path, loader: Loader | None = None,
          log: Callable[[str], None] = lambda _m: None) -> list[Path]:
    """Write each named set (all when empty) as `dest/<name>.jsonl`; all-or-nothing (module doc).
    loader=None reads the hub, which fails at once, in one line, when HF offline mode is set."""
    sets = resolve_names(names)
    if loader is None:
        if offline():
            raise BulwarkInputError("bulwark data fetch needs the Hugging Face hub but HF offline mode is set "
                                    "(HF_HUB_OFFLINE); unset it, or fetch from saved sets with --from-disk DIR")
        loader = hub_loader
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BulwarkInputError(f"cannot create data folder {dest} ({exc.strerror}); choose another with --dir") from None
    staged: list[tuple[Path, Path, DataSet, int]] = []
    try:
        for dataset in sets:
            log(f"{dataset.name}: {dataset.source}")
            try:
                rows = convert_rows(dataset, loader(dataset))
            except BulwarkInputError:
                raise
            except Exception as exc:  # noqa: BLE001  (network, auth, a moved file: one line each)
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise BulwarkInputError(f"{dataset.name}: could not load {dataset.source} ({type(exc).__name__}"
                                        f"{': ' + first if first else ''}); check the network (or use --from-disk "
                                        "DIR); nothing was written") from None
            if not rows:
                raise BulwarkInputError(f"{dataset.name}: {dataset.source} gave no rows; nothing was written")
            final = dest / f"{dataset.name}.jsonl"
            tmp = dest / f".{dataset.name}.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                staged.append((tmp, final, dataset, len(rows)))
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except BaseException:
        for tmp, *_ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final, _, _ in staged:
        tmp.replace(final)
    write_sources(dest, [(d, n) for _, _, d, n in staged])
    return [final for _, final, _, _ in staged]


SOURCES_BEGIN = "<!-- bulwark data fetch: begin (rewritten by every fetch) -->"
SOURCES_END = "<!-- bulwark data fetch: end -->"


def sources_line(dataset: DataSet, rows: int, day: str) -> str:
    return f"| {dataset.name}.jsonl | {rows} | {dataset.source} | {dataset.licence} | {day} |"


def write_sources(dest: Path, fetched: list[tuple[DataSet, int]]) -> None:
    """Keep one line per fetched set in dest/SOURCES.md (inside Bulwark's own block, so a user's notes in the
    file stay); sets fetched earlier keep their lines."""
    path = dest / "SOURCES.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    before, after, lines = text, "", {}
    if SOURCES_BEGIN in text and SOURCES_END in text:
        before, rest = text.split(SOURCES_BEGIN, 1)
        block, after = rest.split(SOURCES_END, 1)
        for line in block.splitlines():
            if line.startswith("| ") and ".jsonl |" in line:
                lines[line.split("|")[1].strip()] = line
    day = datetime.date.today().isoformat()
    for dataset, rows in fetched:
        lines[f"{dataset.name}.jsonl"] = sources_line(dataset, rows, day)
    header = ["Fetched by `bulwark data fetch` from the Hugging Face hub. Research use: several sets are "
              "non-commercial (CC BY-NC 4.0); the harmful sets hold real harmful text.", "",
              "| file | rows | source | licence | fetched |", "|---|---|---|---|---|"]
    block = "\n".join([SOURCES_BEGIN, *header, *(lines[k] for k in sorted(lines)), SOURCES_END])
    if not before.strip() and not text:
        before = "# Data: provenance\n\n"
    content = before + block + (after if after else "\n")
    tmp = path.with_name(".SOURCES.md.tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)


def describe() -> list[dict[str, str]]:
    """The catalogue as rows for `bulwark data list`."""
    return [{"name": d.name, "source": d.source, "licence": d.licence, "what": d.what} for d in CATALOG.values()]
