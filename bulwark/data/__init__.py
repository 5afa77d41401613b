"""Data: read files, convert formats, render prompt templates, build the attack mix, stream batches."""

from bulwark.data.collate import pad_collate
from bulwark.data.formats import (
    AGNEWS_INSTRUCTION,
    FORMATS,
    LABEL_WORDS,
    SST2_INSTRUCTION,
    Example,
    guess_format,
    load_examples,
)
from bulwark.data.mix import build_attack_mix, write_mix_manifest
from bulwark.data.readers import DATA_DIR_ENV, LINE_KEY, find_file, read_rows, resolve_data_dir
from bulwark.data.stream import DistributedStream
from bulwark.data.templates import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    IGNORE_INDEX,
    TEMPLATES,
    render_prompt,
    tokenize_example,
)

__all__ = [
    "AGNEWS_INSTRUCTION", "ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "DATA_DIR_ENV", "FORMATS", "IGNORE_INDEX",
    "LABEL_WORDS", "LINE_KEY", "SST2_INSTRUCTION", "TEMPLATES", "DistributedStream", "Example",
    "build_attack_mix", "find_file", "guess_format", "load_examples", "pad_collate", "read_rows",
    "render_prompt", "resolve_data_dir", "tokenize_example", "write_mix_manifest",
]
