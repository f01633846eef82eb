"""The optimizer: the reference's schedule and AdamW, with non-finite updates skipped.

`chain(clip_by_global_norm, adamw(schedule))` on the mean gradient of an update's
micro-batches; no weight decay on biases and LayerNorm. An update whose gradient is
not finite (NaN or inf in any micro-batch) is skipped whole: neither params nor AdamW's
moments (nor its step count, so the schedule resumes where it stopped) move, and the
skip is counted in the optimizer state (`skip_counts`). `train.max_consecutive_skips`
skips in a row stop the run (`too_many_skips` is its error).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import numpy as np
import optax


class NonFiniteError(FloatingPointError):
    """Too many non-finite updates in a row, or a non-finite state about to be saved."""


def learning_rate_schedule(peak: float, total_updates: int, warmup_fraction: float) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then linear decay to 0 at `total_updates` (the reference's)."""
    warmup = int(math.ceil(warmup_fraction * total_updates))
    decay = optax.linear_schedule(peak, 0.0, max(total_updates - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on kernels and embeddings only, not on biases and LayerNorm (the reference's)."""
    def decays(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config, total_updates: int):
    """(optimizer, schedule): clip -> AdamW on an update's mean gradient, non-finite updates
    skipped and counted. `optax.apply_if_finite` with an unreachable limit: past its limit
    it would apply them; the loop stops the run instead."""
    t = train_config
    schedule = learning_rate_schedule(t.learning_rate, total_updates, t.warmup_fraction)
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                    weight_decay=t.weight_decay, mask=decay_mask))
    return optax.apply_if_finite(inner, max_consecutive_errors=np.iinfo(np.int32).max), schedule


def skip_counts(opt_state):
    """(skipped updates in all, skipped in a row up to now) from the optimizer state."""
    return opt_state.total_notfinite, opt_state.notfinite_count


def too_many_skips(consecutive: int, limit: int, update: int, last_checkpoint: Optional[str]) -> NonFiniteError:
    """The error that stops a run after `limit` non-finite updates in a row."""
    return NonFiniteError(
        f"{consecutive} updates in a row (the last at update {update}) had a non-finite loss "
        f"or gradients and were skipped (train.max_consecutive_skips={limit}); stopping. "
        f"Last checkpoint: {last_checkpoint or 'none'}. Lower train.learning_rate or check "
        "the data, then run the same command to resume")
