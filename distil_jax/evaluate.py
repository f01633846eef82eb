"""Held-out evaluation with fixed masks: the same positions for every model compared.

Masks are drawn once, uniformly over the non-special real tokens (ceil(15%) per batch,
80/10/10), from `eval.seed`; every model sees the same masked inputs. Reported per
model: MLM accuracy and perplexity on the masked positions; against a reference (the
teacher): KL(reference || model) at T=1 over all real tokens and top-1 agreement.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import losses
from distil_jax.masking import mask_tokens

Batch = Dict[str, np.ndarray]


def fixed_masked_batches(batches: List[Batch], vocab, seed: int, mask_prop: float = 0.15) -> List[Batch]:
    """Each batch with `masked_ids`, `labels`, `targets` drawn once from `seed`."""
    probs = np.ones(vocab.vocab_size, np.float32)
    probs[list(vocab.special_ids)] = 0.0

    @jax.jit
    def draw(rng, ids, am):
        return mask_tokens(rng, ids, am, probs, vocab.special_ids, vocab.mask_id, vocab.vocab_size,
                           mask_prop=mask_prop)

    out = []
    for i, b in enumerate(batches):
        masked, labels, targets = jax.device_get(draw(jax.random.fold_in(jax.random.key(seed), i),
                                                      b["input_ids"], b["attention_mask"]))
        out.append({**b, "masked_ids": masked, "labels": labels, "targets": targets})
    return out


def _forward(module):
    return jax.jit(lambda params, ids, am: module.apply({"params": params}, ids, am).logits)


def evaluate_models(models: Dict[str, Tuple[object, object]], batches: List[Batch],
                    reference: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Metrics of every model on the same masked batches (see module docstring)."""
    forwards = {name: _forward(module) for name, (module, _) in models.items()}
    sums = {name: dict(correct=0.0, nll=0.0, targets=0.0, kl=0.0, agree=0.0, real=0.0) for name in models}
    for b in batches:
        ids, am, labels, targets = b["masked_ids"], b["attention_mask"], b["labels"], b["targets"]
        logits = {name: forwards[name](models[name][1], ids, am) for name in models}
        ref = logits.get(reference) if reference else None
        n_t, n_r = float(targets.sum()), float(am.sum())
        for name, lg in logits.items():
            s = sums[name]
            s["targets"] += n_t
            s["real"] += n_r
            s["correct"] += float(losses.accuracy(lg, labels, targets)) * n_t
            s["nll"] += float(losses.mlm_loss(lg, labels, targets)) * n_t
            if ref is not None:
                s["kl"] += float(losses.kd_loss(lg, ref, am, 1.0)) * n_r
                s["agree"] += float(losses.accuracy(lg, jnp.argmax(ref, -1), am)) * n_r
    results = {}
    for name, s in sums.items():
        t, r = max(s["targets"], 1.0), max(s["real"], 1.0)
        results[name] = {"mlm_accuracy": s["correct"] / t, "perplexity": math.exp(min(s["nll"] / t, 50.0)),
                         "targets": int(s["targets"])}
        if reference and name != reference:
            results[name].update(kl_from_teacher=s["kl"] / r, agreement_with_teacher=s["agree"] / r)
    return results


def most_frequent_accuracy(batches: List[Batch], token_counts: np.ndarray, special_ids) -> Tuple[int, float]:
    """(token, accuracy) of always predicting the most frequent non-special training token."""
    counts = np.asarray(token_counts, np.float64).copy()
    counts[list(special_ids)] = -1
    token = int(np.argmax(counts))
    hits = sum(float(((b["labels"] == token) & (b["targets"] == 1)).sum()) for b in batches)
    total = sum(float(b["targets"].sum()) for b in batches)
    return token, hits / max(total, 1.0)


def inference_seconds(module, params, batches: List[Batch], repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of a forward pass over `batches` (compiled beforehand)."""
    forward = _forward(module)
    for b in batches:  # compile every shape first
        forward(params, b["input_ids"], b["attention_mask"]).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            forward(params, b["input_ids"], b["attention_mask"]).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def held_out_batches(config, workdir: str, vocab_size: int, num_batches: int) -> Tuple[List[Batch], object]:
    """The first `num_batches` batches of the held-out split (unshuffled), and the VocabInfo."""
    from distil_jax.data import make_data
    it, vocab = make_data(config, "eval", config.eval.batch_size, vocab_size=vocab_size, workdir=workdir)
    return [next(it) for _ in range(num_batches)], vocab


def compare_on_held_out(config, workdir: str, models: Dict[str, Tuple[object, object]],
                        reference: Optional[str] = "teacher"):
    """Every model on the same fixed masks of `eval.batches` held-out batches, with the
    most-frequent-token baseline; returns (results, the unmasked batches)."""
    vocab_size = next(iter(models.values()))[0].config.vocab_size
    batches, vocab = held_out_batches(config, workdir, vocab_size, config.eval.batches)
    masked = fixed_masked_batches(batches, vocab, config.eval.seed)
    results = evaluate_models(models, masked, reference=reference if reference in models else None)
    token, acc = most_frequent_accuracy(masked, vocab.token_counts, vocab.special_ids)
    results["most_frequent_token"] = {"token": token, "mlm_accuracy": acc}
    return results, batches


def run_eval(config, workdir: str) -> Dict:
    """Mode `eval`: the newest checkpoint in workdir (if any), the teacher and `eval.hf_dirs`."""
    from distil_jax import hf, train
    from distil_jax.experiment import load_teacher
    models = {}
    if config.teacher.path and config.mode != "pretrain":
        teacher, params, _ = load_teacher(config)
        models["teacher"] = (type(teacher)(teacher.config), params)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        run = train.make_run(train.as_trained(config, workdir), workdir, split="eval")
        params, _ = train.restore_params(run)
        models["checkpoint"] = (run.exp.model, params)
    for path in config.eval.hf_dirs:
        models[os.path.basename(os.path.normpath(path))] = hf.load_hf_model(path)
    if not models:
        raise FileNotFoundError(f"nothing to evaluate: no checkpoint in {workdir}, no teacher.path, "
                                "no eval.hf_dirs")
    results, _ = compare_on_held_out(config, workdir, models)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results
