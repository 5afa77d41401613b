"""Prompts and scores for recover: the recovery and task prompt sets, the task metric, the HS figure.

Task metrics (higher is better; every rank calls them and gets the same number):
  accuracy  greedy answers to the first `task.n` rows of `task.eval_set`, scored by bulwark.eval.metrics
            (sst2 / agnews / gsm8k), in percent
  loss      exp(-mean response-token loss) over the same rows: the geometric mean probability of the
            reference answer, in (0, 1]; a floor of 95% of B's value lets the loss rise by -ln 0.95 = 0.051
  auto      accuracy when the eval package and an sst2 / agnews / gsm8k eval set are there, else loss

Device: token batches move to the model's weights' device for each forward, and the counters summed over
ranks live there too (bulwark.engine's collective helpers stage them for the process group).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bulwark.data import Example, load_examples, render_prompt, tokenize_example
from bulwark.data.formats import guess_format
from bulwark.data.readers import find_file
from bulwark.engine import all_gather_objects, all_reduce_sum, broadcast_object
from bulwark.errors import BulwarkInputError
from bulwark.recover.base import TaskMetric
from bulwark.recover.base import world as _world
from bulwark.recover.config import RecoverConfig
from bulwark.recover.hidden import Batch, make_batches, prompt_ids, weights_device

ACCURACY_TASKS = ("sst2", "agnews", "gsm8k")


def load_rows(source: str, n: int, data_dir: str | Path | None, what: str, fmt: str | None = None) -> list[Example]:
    """The first n rows of a data set, or one clear error naming the config key."""
    try:
        if not source.startswith("hf:"):
            find_file(source, data_dir)  # a missing file says so before its format is guessed
        rows = load_examples(source, fmt, data_dir)
    except BulwarkInputError as exc:
        raise BulwarkInputError(f"{what}: {exc}") from None
    rows = [r for r in rows if r.prompt.strip()][:n]
    if not rows:
        raise BulwarkInputError(f"{what}: {source} has no prompts")
    return rows


def render(rows: list[Example], tokenizer: Any, template: str) -> list[str]:
    return [render_prompt(Example(r.prompt, "", input=r.input), template, tokenizer) for r in rows]


def prompt_batches(rows: list[Example], tokenizer: Any, cfg: RecoverConfig, micro_batch_size: int) -> list[Batch]:
    """Micro-batches of the rendered prompts, shortest first: prompts of similar length share a batch, so
    little compute goes to padding (only means over all prompts are used, so their order does not matter)."""
    ids = [prompt_ids(tokenizer, text, cfg.data.max_length) for text in render(rows, tokenizer, cfg.data.template)]
    ids.sort(key=len)
    return make_batches(ids, tokenizer.pad_token_id, micro_batch_size)


def _prompt_rows(cfg: RecoverConfig, which: str, data_dir: str | Path | None) -> list[Example]:
    data = cfg.data
    if which == "harmful":
        return load_rows(data.harmful, data.harmful_n, data_dir, "data.harmful", data.harmful_format)
    if which == "task":
        return load_rows(data.task, data.task_n, data_dir, "data.task", data.task_format)
    raise ValueError(f"prompt set {which!r}: harmful or task")


def prompt_set(cfg: RecoverConfig, which: str, tokenizer: Any, micro_batch_size: int,
               data_dir: str | Path | None) -> list[Batch]:
    """The config's `data.harmful` (recovery / calibration prompts) or `data.task` prompts, batched."""
    return prompt_batches(_prompt_rows(cfg, which, data_dir), tokenizer, cfg, micro_batch_size)


def check_prompt_sets(cfg: RecoverConfig, data_dir: str | Path | None, *, harmful: bool = False,
                      task: bool = False) -> None:
    """Before any rank starts: the prompt sets a method reads, the task eval set and the HS prompts exist
    and hold rows (each a one-line error naming its key)."""
    if harmful:
        _prompt_rows(cfg, "harmful", data_dir)
    if task:
        _prompt_rows(cfg, "task", data_dir)
    load_rows(cfg.task.eval_set, cfg.task.n, data_dir, "task.eval_set")
    if cfg.eval.n > 0:
        from bulwark.eval.judges import check_judge_name

        check_judge_name(cfg.eval.judge)
        load_rows(cfg.eval.prompts, cfg.eval.n, data_dir, "eval.prompts", fmt="prompt_only")


def generate_my_share(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                      batch_size: int = 16) -> tuple[list[int], list[str]]:
    """(this rank's prompt indices r, r + world, ..., greedy answers to them).

    Every rank generates for the same number of prompts (the last ones padded with a repeat whose output
    is dropped): on a ZeRO-3 partitioned model each forward is a collective, so ranks must run the same
    number of generate calls (`generate` keeps them in step within a call once one finishes early)."""
    from bulwark.eval.generate import generate

    rank, world = _world()
    mine = list(range(rank, len(prompts), world))
    share = math.ceil(len(prompts) / world)
    padded = [prompts[i] for i in mine] + [prompts[0]] * (share - len(mine))
    return mine, generate(model, tokenizer, padded, max_new_tokens, batch_size)[: len(mine)]


# ---- the task metric ---------------------------------------------------------------------------------


def metric_kind(cfg: RecoverConfig) -> str:
    """accuracy | loss, resolving `auto`; errors when accuracy is asked of a set it cannot score."""
    fmt = guess_format(cfg.task.eval_set)
    if cfg.task.metric == "loss":
        return "loss"
    try:
        import bulwark.eval.generate  # noqa: F401
        import bulwark.eval.metrics  # noqa: F401

        have_eval = True
    except ImportError:
        have_eval = False
    if cfg.task.metric == "auto":
        return "accuracy" if have_eval and fmt in ACCURACY_TASKS else "loss"
    if fmt not in ACCURACY_TASKS:
        raise BulwarkInputError(
            f"task.metric=accuracy scores {', '.join(ACCURACY_TASKS)} rows; {cfg.task.eval_set} is {fmt}: "
            "use task.metric=loss"
        )
    if not have_eval:
        raise BulwarkInputError("task.metric=accuracy needs the bulwark.eval package; use task.metric=loss")
    return "accuracy"


def task_metric(cfg: RecoverConfig, tokenizer: Any, data_dir: str | Path | None) -> tuple[TaskMetric, str]:
    """(metric, description) for the config's task section."""
    kind = metric_kind(cfg)
    rows = load_rows(cfg.task.eval_set, cfg.task.n, data_dir, "task.eval_set")
    if kind == "accuracy":
        return accuracy_metric(rows, guess_format(cfg.task.eval_set), tokenizer, cfg), (
            f"{guess_format(cfg.task.eval_set)} accuracy (%) on the first {len(rows)} rows of {cfg.task.eval_set}")
    return loss_metric(rows, tokenizer, cfg), (
        f"exp(-response token loss) on the first {len(rows)} rows of {cfg.task.eval_set}")


def accuracy_metric(rows: list[Example], task: str, tokenizer: Any, cfg: RecoverConfig) -> TaskMetric:
    from bulwark.eval.metrics import is_correct

    prompts = render(rows, tokenizer, cfg.data.template)

    def metric(model: torch.nn.Module) -> float:
        mine, outputs = generate_my_share(model, tokenizer, prompts, cfg.task.max_new_tokens, cfg.task.batch_size)
        correct = sum(is_correct(task, out, rows[i].label or "") for i, out in zip(mine, outputs, strict=True))
        counts = all_reduce_sum(torch.tensor([float(correct), float(len(mine))], dtype=torch.float64,
                                             device=weights_device(model)))
        return 100.0 * float(counts[0]) / float(counts[1])

    return metric


def loss_metric(rows: list[Example], tokenizer: Any, cfg: RecoverConfig) -> TaskMetric:
    from bulwark.data import pad_collate

    features = [tokenize_example(r, tokenizer, cfg.data.template, cfg.data.max_length) for r in rows]
    size = cfg.task.batch_size
    batches = [pad_collate(features[i : i + size], tokenizer.pad_token_id) for i in range(0, len(features), size)]

    @torch.no_grad()
    def metric(model: torch.nn.Module) -> float:
        rank, world = _world()
        device = weights_device(model)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # summed on the device: one sync at the end
        for index in range(rank, math.ceil(len(batches) / world) * world, world):
            # the same number of forwards on every rank (collectives on a partitioned model): a rank out
            # of batches runs the first one again and drops the result
            batch = batches[index] if index < len(batches) else batches[0]
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            labels = batch["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                ignore_index=-100)
            if index < len(batches):
                total[0] += nll.double()
                total[1] += (labels != -100).sum()
        total = all_reduce_sum(total)
        return math.exp(-float(total[0]) / max(1.0, float(total[1])))

    return metric


# ---- the harmful score ---------------------------------------------------------------------------------


def harm_metric(cfg: RecoverConfig, tokenizer: Any, data_dir: str | Path | None) -> TaskMetric | None:
    """HS (%) of greedy answers to the first eval.n prompts, judged on rank 0; None when eval.n = 0."""
    if cfg.eval.n == 0:
        return None
    from bulwark.eval.judges import get_judge

    source = {"harmbench": "harmbench_behaviors"}.get(cfg.eval.prompts, cfg.eval.prompts)
    rows = load_rows(source, cfg.eval.n, data_dir, "eval.prompts", fmt="prompt_only")
    prompts = render(rows, tokenizer, cfg.data.template)
    judge = get_judge(cfg.eval.judge, data_dir) if _world()[0] == 0 else None

    def metric(model: torch.nn.Module) -> float:
        rank = _world()[0]
        mine, outputs = generate_my_share(model, tokenizer, prompts, cfg.eval.max_new_tokens)
        answers: dict[int, str] = dict(zip(mine, outputs, strict=True))
        answers = {i: text for part in all_gather_objects(answers) for i, text in part.items()}
        score = None
        if rank == 0:
            ordered = [answers[i] for i in range(len(rows))]
            verdicts = judge.judge([r.prompt for r in rows], ordered)
            score = 100.0 * sum(v.harmful for v in verdicts) / len(verdicts)
        return float(broadcast_object(score, 0))

    return metric
