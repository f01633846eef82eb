"""Dynamic MLM masking inside the jitted step (the reference's `prepare_batch_mlm`).

Over the whole batch, exactly ceil(mask_prop x real tokens) targets are drawn without
replacement with probability proportional to `token_probs` (max(count, 1)^-smoothing:
rare tokens are masked more often than their frequency alone would give, XLM's
smoothing), never padding nor special tokens. Each target then becomes [MASK] (80%),
stays (10%) or becomes a uniformly random token (10%).

Held-out evaluation partitions instead (`target_partition`): every real token is a
target in exactly one of `passes` passes, with the same 80/10/10 corruption (`corrupt`).

Sampling without replacement is the Gumbel-top-k trick: adding Gumbel noise to log
weights and keeping the k largest draws k items exactly as sequential multinomial
draws without replacement do, and it is a fixed-shape computation.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100  # label of rows that are not targets, as in Hugging Face


def token_probs_from_counts(counts, smoothing: float = 0.7, special_ids: Sequence[int] = ()) -> np.ndarray:
    """max(count, 1) ** -smoothing per vocabulary id, 0 for special tokens (float32)."""
    probs = np.maximum(np.asarray(counts, np.float64), 1.0) ** -smoothing
    probs[np.asarray(list(special_ids), np.int64)] = 0.0
    return probs.astype(np.float32)


def mask_tokens(rng, input_ids, attention_mask, token_probs, special_ids: Sequence[int],
                mask_id: int, vocab_size: int, mask_prop: float = 0.15, word_mask: float = 0.8,
                word_keep: float = 0.1, word_rand: float = 0.1) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (masked input ids, labels with IGNORE_INDEX off-target, [B, S] 0/1 target weights)."""
    select_rng, kind_rng, rand_rng = jax.random.split(rng, 3)
    real = attention_mask.astype(bool)
    eligible = real & (jnp.take(jnp.asarray(token_probs), input_ids) > 0)
    for special in special_ids:
        eligible &= input_ids != special

    n_targets = jnp.ceil(mask_prop * jnp.sum(real)).astype(jnp.int32)
    n_targets = jnp.minimum(n_targets, jnp.sum(eligible))

    flat_probs = jnp.where(eligible, jnp.take(jnp.asarray(token_probs), input_ids), 0.0).reshape(-1)
    keys = jnp.log(flat_probs) + jax.random.gumbel(select_rng, flat_probs.shape)
    keys = jnp.where(flat_probs > 0, keys, -jnp.inf)
    order = jnp.argsort(-keys)
    chosen = jnp.zeros(flat_probs.shape, bool).at[order].set(jnp.arange(order.size) < n_targets)
    targets = chosen.reshape(input_ids.shape) & eligible

    masked_ids, labels = corrupt(kind_rng, rand_rng, input_ids, targets, mask_id, vocab_size,
                                 word_mask, word_keep, word_rand)
    return masked_ids, labels, targets.astype(jnp.int32)


def corrupt(kind_rng, rand_rng, input_ids, targets, mask_id: int, vocab_size: int,
            word_mask: float = 0.8, word_keep: float = 0.1, word_rand: float = 0.1):
    """(masked ids, labels): each target becomes [MASK], stays, or a uniformly random token,
    with probabilities proportional to word_mask, word_keep, word_rand."""
    total = word_mask + word_keep + word_rand
    kind = jax.random.choice(kind_rng, 3, shape=input_ids.shape,
                             p=jnp.array([word_mask, word_keep, word_rand]) / total)
    random_ids = jax.random.randint(rand_rng, input_ids.shape, 0, vocab_size, input_ids.dtype)
    replaced = jnp.where(kind == 0, mask_id, jnp.where(kind == 1, input_ids, random_ids))
    masked_ids = jnp.where(targets, replaced, input_ids).astype(input_ids.dtype)
    labels = jnp.where(targets, input_ids, IGNORE_INDEX).astype(input_ids.dtype)
    return masked_ids, labels


def target_partition(rng, input_ids, attention_mask, special_ids: Sequence[int], passes: int) -> jax.Array:
    """Each real, non-special token's pass in 0..passes-1 (uniformly at random), -1 elsewhere:
    over `passes` passes, every such token is a target exactly once (held-out evaluation)."""
    eligible = attention_mask.astype(bool)
    for special in special_ids:
        eligible &= input_ids != special
    assigned = jnp.floor(jax.random.uniform(rng, input_ids.shape) * passes).astype(jnp.int32)
    return jnp.where(eligible, jnp.minimum(assigned, passes - 1), -1)
