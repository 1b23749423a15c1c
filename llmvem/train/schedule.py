"""Learning-rate schedules as pure functions of the optimizer step (so resuming needs only the step count)."""

from __future__ import annotations

import math

from llmvem.config import StageConfig

__all__ = ["lr_factor"]


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, stage: StageConfig) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    A linear warm-up over ``stage.warmup_steps`` steps (from ``1/warmup`` to 1), then:

    * ``"cosine"``: half a cosine from 1 to 0 over the remaining steps;
    * ``"step"``: ``step_gamma ** (epoch // step_every)``;
    * ``"constant"``: 1.

    Parameters
    ----------
    step : int
    total_steps : int
        Optimizer steps in the stage (epochs × steps per epoch).
    steps_per_epoch : int
    stage : StageConfig
    """
    warm = stage.warmup_steps
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if stage.schedule == "constant":
        return 1.0
    if stage.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return float(stage.step_gamma ** (epoch // stage.step_every))
    span = max(total_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
