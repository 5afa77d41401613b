"""Turn raw rows into Examples, one converter per data format.

An Example is (instruction-style) prompt + optional input + response. Task formats (sst2, agnews) put
the fixed task instruction in `prompt` and the row's text in `input`, so the Alpaca template renders
"### Input:" the same way the Vaccine / Lisa / Booster reference code does.

A converter is called as FORMATS[name](row, source): `row` comes from readers.read_rows (it carries
"__line__"), `source` is the file as it should appear in error messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bulwark.data.readers import LINE_KEY, find_file, read_rows, row_location, split_row_slice
from bulwark.errors import BulwarkInputError


@dataclass
class Example:
    prompt: str  # the user's question, or a task's instruction
    response: str  # the target answer ("" for prompt-only eval sets)
    source: str = ""  # short name of the data set it came from, e.g. "sst2_train"
    harmful: bool = False  # True for rows injected by the attack mix / harmful sets
    label: str | None = None  # gold answer for scoring (label word, GSM8K's final number); harm category for eval prompts
    input: str = ""  # task input (the sentence / article), rendered under "### Input:"


SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative."
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n"
)
# Label words by class index: the eval module matches generated text against these.
LABEL_WORDS: dict[str, list[str]] = {
    "sst2": ["negative", "positive"],
    "agnews": ["World", "Sports", "Business", "Sci/Tech"],
}


def short_name(source: str) -> str:
    """"/data/sst2_train.jsonl" -> "sst2_train"; hf: sources stay as given."""
    return source if source.startswith("hf:") else Path(source).stem


def _text(row: dict, key: str, fmt: str, source: str, required: bool = True) -> str:
    """row[key] as a string, with an error naming FILE:LINE when it is missing or not text."""
    if key not in row:
        if not required:
            return ""
        has = ", ".join(k for k in row if k != LINE_KEY) or "no keys"
        raise BulwarkInputError(
            f"{row_location(source, row)}: missing key '{key}' for format {fmt} (has: {has}); "
            "fix the row or choose another data format"
        )
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BulwarkInputError(
            f"{row_location(source, row)}: key '{key}' must be text for format {fmt}, got {json_type(value)}"
        )
    return value


def _class_index(row: dict, fmt: str, source: str) -> int:
    """The integer class label of a classification row (also accepts "1" written as a string)."""
    words = LABEL_WORDS[fmt]
    if "label" not in row:
        _text(row, "label", fmt, source)  # raises the missing-key error
    value = row["label"]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(words):
        raise BulwarkInputError(
            f"{row_location(source, row)}: label {value!r} for format {fmt} must be an integer 0..{len(words) - 1} "
            f"({', '.join(f'{i} {w}' for i, w in enumerate(words))})"
        )
    return value


def json_type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def qa(row: dict, source: str) -> Example:
    """prompt/response pairs: BeaverTails harmful, safe and refusal data."""
    return Example(prompt=_text(row, "prompt", "qa", source), response=_text(row, "response", "qa", source),
                   source=short_name(source))


def sst2(row: dict, source: str) -> Example:
    word = LABEL_WORDS["sst2"][_class_index(row, "sst2", source)]
    return Example(prompt=SST2_INSTRUCTION, input=_text(row, "sentence", "sst2", source), response=word,
                   label=word, source=short_name(source))


def agnews(row: dict, source: str) -> Example:
    word = LABEL_WORDS["agnews"][_class_index(row, "agnews", source)]
    return Example(prompt=AGNEWS_INSTRUCTION, input=_text(row, "text", "agnews", source), response=word,
                   label=word, source=short_name(source))


def gsm8k(row: dict, source: str) -> Example:
    # The full worked answer is the target (chain of thought + "#### N"); the label is N for scoring.
    answer = _text(row, "answer", "gsm8k", source)
    label = answer.rsplit("####", 1)[1].strip() if "####" in answer else None
    return Example(prompt=_text(row, "question", "gsm8k", source), response=answer, label=label,
                   source=short_name(source))


def alpaca(row: dict, source: str) -> Example:
    # "input" is optional (AlpacaEval rows have none); "output" is the reference answer.
    return Example(prompt=_text(row, "instruction", "alpaca", source),
                   input=_text(row, "input", "alpaca", source, required=False),
                   response=_text(row, "output", "alpaca", source), source=short_name(source))


def prompt_only(row: dict, source: str) -> Example:
    """Harmful-score prompt sets (BeaverTails eval, AdvBench, HarmBench): a prompt, no response."""
    # the original CSV headers of AdvBench ("goal") and HarmBench ("behavior") are accepted too
    for key in ("prompt", "goal", "behavior"):
        if isinstance(row.get(key), str):
            return Example(prompt=row[key], response="", label=row.get("category"), source=short_name(source))
    return Example(prompt=_text(row, "prompt", "prompt_only", source), response="", source=short_name(source))


FORMATS: dict[str, Callable[[dict, str], Example]] = {
    "qa": qa,
    "sst2": sst2,
    "agnews": agnews,
    "gsm8k": gsm8k,
    "alpaca": alpaca,
    "prompt_only": prompt_only,
}

# File-name prefixes of the known data sets, checked in order (eval sets before "beavertails_").
_GUESSES: list[tuple[tuple[str, ...], str]] = [
    (("harmful_eval_prompts", "advbench", "harmbench", "beavertails_evaluation"), "prompt_only"),
    (("beavertails",), "qa"),
    (("sst2", "sst-2"), "sst2"),
    (("agnews", "ag_news"), "agnews"),
    (("gsm8k",), "gsm8k"),
    (("alpaca",), "alpaca"),
]


def guess_format(source: str) -> str:
    """The format of a known data set from its file name, so configs may leave data.format out."""
    name = source.rsplit("/", 1)[-1] if source.startswith("hf:") else Path(source).name
    name = name.split(":")[0].lower()
    for prefixes, fmt in _GUESSES:
        if name.startswith(prefixes):
            return fmt
    raise BulwarkInputError(
        f"cannot guess the data format of '{source}' from its name; set the format to one of: {', '.join(FORMATS)}"
    )


def load_examples(source: str, fmt: str | None = None, data_dir: str | Path | None = None,
                  harmful: bool = False) -> list[Example]:
    """read_rows + the format's converter. fmt=None guesses from the name; harmful marks every Example."""
    name, _ = split_row_slice(source)
    fmt = fmt or guess_format(name)
    if fmt not in FORMATS:
        raise BulwarkInputError(f"unknown data format '{fmt}' for '{source}'; choose one of: {', '.join(FORMATS)}")
    rows = read_rows(source, data_dir)
    where = name if name.startswith("hf:") else str(find_file(name, data_dir))
    convert = FORMATS[fmt]
    examples = [convert(row, where) for row in rows]
    if harmful:
        examples = [dataclasses.replace(e, harmful=True) for e in examples]
    if not examples:
        raise BulwarkInputError(f"{where}: no rows")
    return examples
