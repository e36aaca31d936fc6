"""Optimizers and the learning-rate schedule shared by `base` (pre-training) and `train` (fine-tuning)."""
from __future__ import annotations

import math
import warnings

import torch

from pipeline.errors import InputError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def make(groups: list[dict], name: str = "adamw", weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over `groups`; `adamw8bit`: its two moment estimates stored in 8 bits (block-wise quantised,
    bitsandbytes), a quarter of fp32's memory; `paged_adamw8bit`: the same in unified memory that is paged
    to the host when the GPU runs short (on the CPU: plain 8-bit). Tensors under 4,096 values keep fp32
    states (bitsandbytes' rule), so the tiny built-in model is barely affected."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise InputError(f"train.optimizer: unknown optimizer {name!r} (one of {list(OPTIMIZERS)})")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise InputError(f"train.optimizer={name} needs bitsandbytes: {e}") from None
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    with warnings.catch_warnings():  # "paged optimizers are not supported on CPU": falls back to 8-bit
        warnings.simplefilter("ignore", UserWarning)
        return cls(groups, weight_decay=weight_decay)


def schedule(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10 % (a multiplier of each group's own learning rate)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
