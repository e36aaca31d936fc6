"""Learning-rate schedule shared by `base` (pre-training) and `train` (fine-tuning)."""
from __future__ import annotations

import math


def schedule(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10 % (a multiplier of each group's own learning rate)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
