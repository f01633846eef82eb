"""Held-out evaluation on fixed masks, and paired comparisons of models (mode eval).

    python -m distil_jax.main --config=CONFIG --workdir=DIR --config.mode=eval

Masks are fixed once from `eval.seed` and shared by every model: the real, non-special
tokens of each held-out sequence are split at random into `eval.passes` passes, and in
each pass its share are the targets (with the training's 80/10/10 corruption), so over
the passes every held-out token is a target exactly once (7 passes: ~14% masked at a
time). Reported per model: MLM accuracy and perplexity at the targets; against a
reference (the teacher): KL(reference || model) at T=1 over the real tokens and top-1
agreement. For each pair of models, the difference in accuracy and its paired standard
error: from the per-target differences (hit minus hit, on the same target), clustered by
held-out sequence (targets of one sequence are not independent), so it is the standard
error a comparison on other held-out text of this kind would show.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.apps import stages
from distil_jax.bench.timing import median_seconds
from distil_jax.interop import hf
from distil_jax.train import losses
from distil_jax.checkpoint import NoCheckpointError, load_model
from distil_jax.data import make_data
from distil_jax.train.masking import corrupt, target_partition

Batch = Dict[str, np.ndarray]


def fixed_masked_batches(batches: List[Batch], vocab, seed: int, passes: int = 7,
                         masking=None) -> List[Batch]:
    """`passes` masked copies of each batch: `masked_ids`, `labels`, `targets` and each row's
    held-out `sequence` index (for clustering); every real token a target exactly once."""
    m = {"word_mask": 0.8, "word_keep": 0.1, "word_rand": 0.1, **(masking or {})}

    @jax.jit
    def draw(rng, ids, am):
        part_rng, rng = jax.random.split(rng)
        part = target_partition(part_rng, ids, am, vocab.special_ids, passes)
        out = []
        for p in range(passes):
            targets = part == p
            kind_rng, rand_rng = jax.random.split(jax.random.fold_in(rng, p))
            masked, labels = corrupt(kind_rng, rand_rng, ids, targets, vocab.mask_id, vocab.vocab_size, **m)
            out.append((masked, labels, targets.astype(jnp.int32)))
        return out

    out, first = [], 0
    for i, b in enumerate(batches):
        rows = np.arange(first, first + len(b["input_ids"]))
        first += len(rows)
        for masked, labels, targets in jax.device_get(draw(jax.random.fold_in(jax.random.key(seed), i),
                                                           b["input_ids"], b["attention_mask"])):
            out.append({**b, "masked_ids": masked, "labels": labels, "targets": targets, "sequence": rows})
    return out


def jitted_logits(module):
    """The jitted MLM logits of `module`: (params, input_ids, attention_mask) -> logits."""
    return jax.jit(lambda params, ids, am: module.apply({"params": params}, ids, am).logits)


def as_forward(model) -> Callable:
    """A model to evaluate: (module, params), or already a forward (input_ids,
    attention_mask) -> logits (an exported model in ONNX Runtime, say)."""
    if callable(model):
        return model
    module, params = model
    logits = jitted_logits(module)
    return lambda ids, am: logits(params, ids, am)


@jax.jit
def _stats(logits, labels, am, ref_logits):
    """Per position: hit and negative log-likelihood of the label; against the reference
    logits (when given): KL(reference || model) at T=1 and top-1 agreement, summed over real tokens."""
    nll = losses.token_nll(logits, labels)
    hit = jnp.argmax(logits, axis=-1) == labels
    n_real = jnp.sum(am).astype(jnp.float32)
    kl = losses.kd_loss(logits, ref_logits, am, 1.0) * n_real
    agree = losses.accuracy(logits, jnp.argmax(ref_logits, -1), am) * n_real
    return hit, nll, kl, agree, n_real


def evaluate_models(models: Dict[str, object], batches: List[Batch], reference: Optional[str] = None):
    """(metrics per model, per-target hits per model, each target's sequence) on the same
    masked batches (see module docstring); a model is what `as_forward` takes."""
    forwards = {name: as_forward(model) for name, model in models.items()}
    hits = {name: [] for name in models}
    nlls = {name: [] for name in models}
    sums = {name: dict(kl=0.0, agree=0.0, real=0.0) for name in models}
    clusters = []
    for b in batches:
        ids, am, labels, targets = b["masked_ids"], b["attention_mask"], b["labels"], b["targets"]
        sel = targets.astype(bool)
        clusters.append(np.broadcast_to(b["sequence"][:, None], targets.shape)[sel])
        logits = {name: forwards[name](ids, am) for name in models}
        ref = logits.get(reference) if reference else None
        for name, lg in logits.items():
            hit, nll, kl, agree, n_real = jax.device_get(_stats(lg, labels, am, lg if ref is None else ref))
            hits[name].append(hit[sel])
            nlls[name].append(nll[sel])
            if ref is not None:
                sums[name]["real"] += float(n_real)
                sums[name]["kl"] += float(kl)
                sums[name]["agree"] += float(agree)
    hits = {name: np.concatenate(h) for name, h in hits.items()}
    results = {}
    for name in models:
        nll = np.concatenate(nlls[name])
        n = max(len(nll), 1)
        results[name] = {"mlm_accuracy": float(hits[name].mean()) if len(nll) else 0.0,
                         "perplexity": math.exp(min(float(nll.sum()) / n, 50.0)), "targets": int(len(nll))}
        if reference and name != reference:
            r = max(sums[name]["real"], 1.0)
            results[name].update(kl_from_teacher=sums[name]["kl"] / r,
                                 agreement_with_teacher=sums[name]["agree"] / r)
    return results, hits, np.concatenate(clusters) if clusters else np.zeros(0, np.int64)


def paired_difference(hits_a: np.ndarray, hits_b: np.ndarray, clusters: np.ndarray) -> Dict[str, float]:
    """Accuracy of a minus accuracy of b on the same targets, with its paired standard error.

    d_i = hit_a,i - hit_b,i per target. `se` is clustered by held-out sequence
    (sum_s (D_s - n_s mean(d))^2 / n^2 x S / (S - 1), D_s the sum of d over sequence s);
    `se_iid` treats targets as independent (std(d) / sqrt(n)). Counts of the targets
    only a hits, only b hits (the discordant pairs) are given too."""
    d = hits_a.astype(np.float64) - hits_b.astype(np.float64)
    n = len(d)
    if n < 2:
        return {"difference": float(d.mean()) if n else 0.0, "se": float("nan"), "se_iid": float("nan"),
                "targets": n, "only_first": int((d > 0).sum()), "only_second": int((d < 0).sum())}
    mean = d.mean()
    ids, inverse = np.unique(clusters, return_inverse=True)
    per_sequence = np.bincount(inverse, weights=d - mean)
    s = len(ids)
    se = math.sqrt(float(np.sum(per_sequence ** 2)) / n ** 2 * s / (s - 1)) if s > 1 else float("nan")
    return {"difference": float(mean), "se": se, "se_iid": float(d.std(ddof=1) / math.sqrt(n)),
            "targets": n, "sequences": s, "only_first": int((d > 0).sum()), "only_second": int((d < 0).sum())}


def paired_comparisons(hits: Dict[str, np.ndarray], clusters: np.ndarray) -> Dict[str, Dict[str, float]]:
    """`paired_difference` for every pair of models, keyed "a - b" (in the order given)."""
    return {f"{a} - {b}": paired_difference(hits[a], hits[b], clusters)
            for a, b in itertools.combinations(hits, 2)}


def pair(pairs: Dict[str, Dict[str, float]], a: str, b: str) -> Dict[str, float]:
    """a - b from `paired_comparisons`, which holds each pair in the order the models came."""
    if f"{a} - {b}" in pairs:
        return pairs[f"{a} - {b}"]
    c = pairs[f"{b} - {a}"]
    return {**c, "difference": -c["difference"], "only_first": c["only_second"], "only_second": c["only_first"]}


def most_frequent_accuracy(batches: List[Batch], token_counts: np.ndarray, special_ids) -> Tuple[int, float]:
    """(token, accuracy) of always predicting the most frequent non-special training token."""
    counts = np.asarray(token_counts, np.float64).copy()
    counts[list(special_ids)] = -1
    token = int(np.argmax(counts))
    hits = sum(float(((b["labels"] == token) & (b["targets"] == 1)).sum()) for b in batches)
    total = sum(float(b["targets"].sum()) for b in batches)
    return token, hits / max(total, 1.0)


def inference_seconds(module, params, batches: List[Batch], repeats: int = 3) -> float:
    """The median over `repeats` of the wall time of a forward pass over `batches` (every
    shape compiled in a first, untimed pass)."""
    logits = jitted_logits(module)

    def one_pass():
        for b in batches:
            logits(params, b["input_ids"], b["attention_mask"]).block_until_ready()
    return median_seconds(one_pass, repeats)[0]


def held_out_batches(config, workdir: str, vocab_size: int) -> Tuple[List[Batch], object]:
    """The held-out split's batches in order (the first `eval.batches`; 0: all), and the VocabInfo."""
    it, vocab = make_data(config, "eval", config.eval.batch_size, vocab_size=vocab_size, workdir=workdir)
    whole = it.batches_per_epoch  # no more: a second pass would count sequences twice
    count = min(config.eval.batches, whole) if config.eval.batches else whole
    return [next(it) for _ in range(count)], vocab


def compare_on_held_out(config, workdir: str, models: Dict[str, object],
                        reference: Optional[str] = "teacher", vocab_size: int = 0):
    """Every model (what `as_forward` takes) on the same fixed masks, the paired comparisons
    and the most-frequent-token baseline: ({"models", "comparisons", "most_frequent_token"},
    the unmasked batches). `vocab_size` defaults to the first (module, params) model's."""
    vocab_size = vocab_size or next(m[0].config.vocab_size for m in models.values() if not callable(m))
    batches, vocab = held_out_batches(config, workdir, vocab_size)
    m = config.masking
    masked = fixed_masked_batches(batches, vocab, config.eval.seed, config.eval.passes,
                                  dict(word_mask=m.word_mask, word_keep=m.word_keep, word_rand=m.word_rand))
    results, hits, clusters = evaluate_models(models, masked, reference if reference in models else None)
    token, acc = most_frequent_accuracy(masked, vocab.token_counts, vocab.special_ids)
    return {"models": results, "comparisons": paired_comparisons(hits, clusters),
            "most_frequent_token": {"token": token, "mlm_accuracy": acc}}, batches


def run(config, workdir: str) -> Dict:
    """Mode eval: the newest checkpoint in workdir (if any), the teacher and `eval.hf_dirs`
    -> WORKDIR/eval.json."""
    models = {}
    if config.teacher.path:
        models["teacher"] = hf.load_hf_model(config.teacher.path)
    try:
        module, params, _ = load_model(workdir)
        models["checkpoint"] = (module, params)
    except NoCheckpointError:
        pass
    for path in config.eval.hf_dirs:
        models[os.path.basename(os.path.normpath(path))] = hf.load_hf_model(path)
    if not models:
        raise NoCheckpointError(os.path.join(workdir, "checkpoints"))
    results, _ = compare_on_held_out(config, workdir, models)
    stages.write_outputs(workdir, {"eval.json": results})
    return results
