"""Optimizer: AdamW with linear warm-up + cosine decay, global-norm clipping, fp32 state.

Weight decay skips 1-D leaves (norm scales, the indexer's LayerNorm): decaying a scale towards 0
changes the function, not just the weight norm.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio · learning_rate
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm gradient clipping (0 = off)

    def __post_init__(self):
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be >= 0.")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1.")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}].")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine to min_lr_ratio·lr at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
        decay_steps=max(c.total_steps, c.warmup_steps + 1), end_value=c.learning_rate * c.min_lr_ratio)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule); moments live in the params' dtype (fp32 master params)."""
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree)
    adamw = optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw) if c.clip_norm > 0 else adamw
