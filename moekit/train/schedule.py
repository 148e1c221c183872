"""Learning-rate and batch-size schedules, as plain functions of the step."""

from __future__ import annotations

import math

from moekit.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_tokens_at(step: int, cfg: TrainConfig) -> int:
    """Tokens per optimizer step: a linear ramp from batch_ramp_start to batch_tokens over
    batch_ramp_steps (GPT-4 ramped its batch up to 60M tokens), rounded down to whole
    micro-batches, at least one."""
    micro = cfg.micro_batch * cfg.seq_len
    target = cfg.batch_tokens or micro
    start = cfg.batch_ramp_start or target
    if cfg.batch_ramp_steps and step < cfg.batch_ramp_steps:
        tokens = start + (target - start) * step / cfg.batch_ramp_steps
    else:
        tokens = target
    return max(1, int(tokens) // micro) * micro
