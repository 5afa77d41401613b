"""Prompt templates and tokenization with a response-only loss mask.

Two templates:
  - "alpaca": the Alpaca prompt the Vaccine / Lisa / Booster papers train and evaluate with
    (with an "### Input:" block when the example has an input, the short variant otherwise);
  - "chat": the tokenizer's own chat template, one user turn, generation prompt appended.
"""

from __future__ import annotations

from typing import Any

from bulwark.data.formats import Example
from bulwark.errors import BulwarkInputError
from bulwark.losses import IGNORE_INDEX

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def render_prompt(example: Example, template: str, tokenizer: Any = None) -> str:
    """The prompt text the model sees before its response (also used for generation at eval)."""
    if template == "alpaca":
        if example.input:
            return ALPACA_WITH_INPUT.format(instruction=example.prompt, input=example.input)
        return ALPACA_NO_INPUT.format(instruction=example.prompt)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise BulwarkInputError(
                "template 'chat' needs a tokenizer with a chat template; this one has none, use template 'alpaca'"
            )
        content = example.prompt + ("\n\n" + example.input if example.input else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise BulwarkInputError(f"unknown prompt template '{template}'; choose one of: {', '.join(TEMPLATES)}")


def _ids(tokenizer: Any, text: str) -> list[int]:
    # No automatic special tokens: the chat template text already spells out its own BOS/markers,
    # and the EOS is appended explicitly after the response.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def tokenize_example(example: Example, tokenizer: Any, template: str, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS; labels = IGNORE_INDEX on the prompt, the ids on response + EOS.

    Prompt and response are tokenized separately and concatenated, so the boundary between them is
    exact: tokenizing the joined text can merge the prompt's last characters with the response's first
    (BPE merges across "\\n" + word), which would shift the loss mask by a token.

    A BOS is prepended only when the tokenizer says it adds one (add_bos_token) and the prompt does not
    already start with it (chat templates such as Llama 3's write it into the text).

    Truncation to max_length keeps the prompt's start and cuts the response's end. If the prompt alone
    fills max_length, no response token would remain (the row would teach nothing), so the prompt is cut
    instead: its first and last tokens are kept (the last hold the template's "### Response:" marker)
    and a quarter of max_length (at least one token) goes to the response's first tokens.
    """
    if max_length < 2:
        raise BulwarkInputError(f"max_length = {max_length} must be at least 2 (one prompt and one response token)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BulwarkInputError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    prompt = _ids(tokenizer, render_prompt(example, template, tokenizer))
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and prompt[:1] != [bos]:
        prompt = [bos] + prompt
    response = _ids(tokenizer, example.response) + [eos]

    if len(prompt) >= max_length:
        keep_response = min(len(response), max(1, max_length // 4))
        budget = max_length - keep_response
        tail = budget // 2
        prompt = prompt[: budget - tail] + (prompt[len(prompt) - tail:] if tail else [])
        response = response[:keep_response]
    else:
        response = response[: max_length - len(prompt)]

    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
    }
