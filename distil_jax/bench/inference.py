"""The forward benchmarks: `infer` (teacher vs student latency and throughput) and
`attention` (cuDNN flash attention against XLA's: errors against float32, time)."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.bench.step import shape_config
from distil_jax.bench.timing import emit, machine, median_seconds
from distil_jax.models import DistilBert, DistilBertConfig
from distil_jax.train import trainer


def bench_attention(args) -> None:
    """The fused attention kernel against XLA's on one BERT-shaped encoder (the student's
    shape, the given dtype) and a right-padded batch (lengths from a quarter to all of
    --seq): the last hidden state and the gradient of a loss on it, each as the relative
    error ||x - ref|| / ||ref|| against XLA attention in float32, and the forward + backward
    time of each. The kernel's error should be the dtype's (the XLA row in the same dtype)."""
    cfg = DistilBertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.student_layers,
                           num_heads=args.heads, intermediate_size=args.ffn,
                           max_position_embeddings=max(512, args.seq))
    rng = np.random.default_rng(0)
    rows = args.batch or 8
    ids = rng.integers(5, args.vocab, (rows, args.seq)).astype(np.int32)
    lengths = rng.integers(args.seq // 4, args.seq + 1, rows)
    mask = (np.arange(args.seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    params = DistilBert(cfg).init(jax.random.key(0), ids[:1], mask[:1])["params"]

    def loss_and_grad(dtype, impl):
        model = DistilBert(cfg, dtype=getattr(jnp, dtype), attention_impl=impl)

        def loss(p):
            h = model.apply({"params": p}, ids, mask, compute_logits=False).hidden_states[-1]
            h = h.astype(jnp.float32) * mask[..., None]
            return jnp.sum(h * jnp.sin(jnp.arange(h.shape[-1]))) / mask.sum(), h
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])

    def rel(x, ref):
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

    (_, h_ref), g_ref = loss_and_grad("float32", None)(params)
    h_ref, g_ref = np.asarray(h_ref, np.float64), flat(g_ref)
    out = {"bench": "attention", "dtype": args.dtype, "batch": rows, "seq": args.seq,
           "layers": args.student_layers, "hidden": args.hidden, **machine()}
    for name, impl in (("xla", None), ("cudnn", "cudnn")):
        f = loss_and_grad(args.dtype, impl)
        try:
            (_, h), g = f(params)
        except Exception as e:  # noqa: BLE001 -- a kernel this device or shape lacks
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        out[f"{name}_hidden_rel_err"] = rel(np.asarray(h, np.float64), h_ref)
        out[f"{name}_grad_rel_err"] = rel(flat(g), g_ref)
        seconds, _ = median_seconds(lambda: jax.block_until_ready(f(params)), args.steps)
        out[f"{name}_fwd_bwd_ms"] = seconds * 1e3
    emit(out)


def bench_infer(args) -> None:
    """Teacher vs student forward (encoder + MLM features, no vocabulary projection)."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer.build(shape_config(args), tmp)
    models = {"teacher": (tr.teacher, tr.teacher_params), "student": (tr.model, tr.initial_params())}
    out = {"bench": "infer", "dtype": args.dtype, **machine()}
    for name, (module, params) in models.items():
        forward = jax.jit(lambda p, ids, am, m=module: m.apply(
            {"params": p}, ids, am, deterministic=True, compute_logits=False).last_hidden_state)
        for setting, rows, seq in (("latency", 1, args.latency_seq),
                                   ("throughput", args.throughput_batch, args.latency_seq)):
            ids = np.random.default_rng(0).integers(5, tr.model.config.vocab_size, (rows, seq)).astype(np.int32)
            am = np.ones_like(ids)
            forward(params, ids, am).block_until_ready()
            seconds, _ = median_seconds(lambda: forward(params, ids, am).block_until_ready(), args.steps)
            out[f"{name}_{setting}_ms"] = seconds * 1e3
            out[f"{name}_{setting}_sequences_per_s"] = rows / seconds
        out[f"{name}_params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    out["latency_speedup"] = out["teacher_latency_ms"] / out["student_latency_ms"]
    out["throughput_speedup"] = out["student_throughput_sequences_per_s"] / out["teacher_throughput_sequences_per_s"]
    out.update(latency_batch=1, throughput_batch=args.throughput_batch, seq=args.latency_seq)
    emit(out)
