"""One optimizer step of the hook loop: the body every training loop runs (the recipes, the step-time
benchmarks and the test scenarios), so that a test of a defense tests the loop a run uses.

    for micro in range(grad_accum):
        batch = defense.next_batch(streams, step)    # on the engine's device
        loss = defense.loss(engine, batch)           # extra passes go through engine.module
        engine.backward(loss)
        engine.step()                                # at the boundary: defense.before_step(shards)
    defense.after_step(engine, step + 1)

A test that needs to look inside a step passes a `StepObserver`; runs pass none.
"""

from __future__ import annotations

from typing import Any

import torch


class StepObserver:
    """Called at the points a test may look at; every method is a no-op here."""

    def before_loss(self, batch: dict[str, torch.Tensor]) -> None:
        """A micro-batch is on the device; its loss is next."""

    def after_loss(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """The micro-batch's loss (and the defense's extra passes) ran; backward is next."""

    def before_after_step(self) -> None:
        """The optimizer stepped for the last micro-batch; `defense.after_step` is next."""


def train_step(engine: Any, defense: Any, streams: dict[str, Any], step: int, grad_accum: int,
               observer: StepObserver | None = None) -> torch.Tensor:
    """Run optimizer step `step` (0-based) over `grad_accum` micro-batches; returns this rank's summed
    micro-batch losses, on the device (one host sync a step, where the caller reads it)."""
    observer = observer or StepObserver()
    loss_sum = torch.zeros(1, device=engine.device)
    for _ in range(grad_accum):
        batch = engine.to_device(defense.next_batch(streams, step))
        observer.before_loss(batch)
        loss = defense.loss(engine, batch)
        observer.after_loss(batch, loss)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
    observer.before_after_step()
    defense.after_step(engine, step + 1)
    return loss_sum
