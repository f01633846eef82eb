"""The peer for `python -m distil_jax.bench compare`: the reference's train step in PyTorch.

What the Hugging Face research project's `distiller.py` (examples/research_projects/
distillation) does per step, written here from its semantics: dynamic masking of the batch (`prepare_batch_mlm`: ceil(15%)
targets drawn without replacement with the smoothed token probabilities, 80/10/10), a
frozen `BertForMaskedLM` teacher under `no_grad`, a `DistilBertForMaskedLM` student, the
triple loss with the KL over every non-pad row (`masked_select` of both [B, S, V] logits),
cross-entropy on the targets, cosine on the last hidden states, then backward, gradient
clipping, AdamW (no decay on biases and LayerNorm) and the linear schedule. torch is an
optional dependency (`pip install torch`), needed only here and in the tests, and is
imported when first used.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import types

import numpy as np
import transformers
from etils import epy

with epy.lazy_imports():  # optional: only `bench compare` needs it
    import torch
    import torch.nn.functional as F


def _models(args):
    common = dict(vocab_size=args.vocab, max_position_embeddings=max(512, args.seq))
    teacher = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=args.hidden, num_hidden_layers=args.teacher_layers, num_attention_heads=args.heads,
        intermediate_size=args.ffn, **common)).eval()
    student = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        dim=args.hidden, n_layers=args.student_layers, n_heads=args.heads, hidden_dim=args.ffn,
        **common)).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    return teacher, student


def _optimizer(student, lr=5e-4, total=1000, warmup=0.05):
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in student.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": 0.0},
        {"params": [p for n, p in student.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, eps=1e-6, betas=(0.9, 0.98))
    warm = math.ceil(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(warm, 1) if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    return opt, sched


def _mask(token_ids, lengths, token_probs, vocab, mask_id, pad_id=0):
    """prepare_batch_mlm: ceil(15%) targets without replacement, 80/10/10."""
    attn_mask = torch.arange(token_ids.size(1))[None, :] < lengths[:, None]
    probs = token_probs[token_ids.flatten()]
    n_tgt = math.ceil(0.15 * lengths.sum().item())
    tgt_ids = torch.multinomial(probs / probs.sum(), n_tgt, replacement=False)
    pred_mask = torch.zeros(token_ids.numel(), dtype=torch.bool)
    pred_mask[tgt_ids] = 1
    pred_mask = pred_mask.view_as(token_ids) & (token_ids != pad_id)
    real = token_ids[pred_mask]
    rand = real.clone().random_(vocab)
    masked = real.clone().fill_(mask_id)
    choice = torch.multinomial(torch.tensor([0.8, 0.1, 0.1]), len(real), replacement=True)
    new = masked * (choice == 0).long() + real * (choice == 1).long() + rand * (choice == 2).long()
    token_ids = token_ids.masked_scatter(pred_mask, new)
    labels = token_ids.new_full(token_ids.shape, -100)
    labels[pred_mask] = real
    return token_ids, attn_mask, labels


def step_timer(args):
    """(one, record): `one()` runs one reference step on args' shapes (random tokens, no
    padding); `record(times)` turns step times into the benchmark's JSON (their median)."""
    torch.set_num_threads(os.cpu_count() or 1)
    teacher, student = _models(args)
    opt, sched = _optimizer(student)
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(5, args.vocab, (args.batch, args.seq)), dtype=torch.long)
    ids[:, 0] = 2
    lengths = torch.full((args.batch,), args.seq, dtype=torch.long)
    token_probs = torch.ones(args.vocab) ** -0.7
    temperature, alphas = 2.0, {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    cos = torch.nn.CosineEmbeddingLoss(reduction="mean")

    def one():
        input_ids, attn_mask, labels = _mask(ids, lengths, token_probs, args.vocab, mask_id=3)
        s_out = student(input_ids=input_ids, attention_mask=attn_mask, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=input_ids, attention_mask=attn_mask, output_hidden_states=True)
        s_logits, t_logits = s_out.logits, t_out.logits
        mask = attn_mask.unsqueeze(-1).expand_as(s_logits)
        s_sel = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
        t_sel = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
        loss_ce = kl(F.log_softmax(s_sel / temperature, dim=-1),
                     F.softmax(t_sel / temperature, dim=-1)) * temperature ** 2
        loss_mlm = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)), labels.view(-1), ignore_index=-100)
        s_h, t_h = s_out.hidden_states[-1], t_out.hidden_states[-1]
        hmask = attn_mask.unsqueeze(-1).expand_as(s_h)
        s_h = torch.masked_select(s_h, hmask).view(-1, s_h.size(-1))
        t_h = torch.masked_select(t_h, hmask).view(-1, s_h.size(-1))
        loss_cos = cos(s_h, t_h, s_h.new_ones(s_h.size(0)))
        loss = alphas["ce"] * loss_ce + alphas["mlm"] * loss_mlm + alphas["cos"] * loss_cos
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        return float(loss.detach())

    def record(times) -> dict:
        seconds = float(np.median(times))
        tokens = args.batch * args.seq
        return {"bench": "compare/torch", "teacher_layers": args.teacher_layers,
                "student_layers": args.student_layers, "hidden": args.hidden, "vocab": args.vocab,
                "batch": args.batch, "seq": args.seq, "step_s": seconds, "step_times_s": list(times),
                "tokens_per_s": tokens / seconds, "sequences_per_s": args.batch / seconds,
                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "attention": getattr(student.config, "_attn_implementation", None)}
    return one, record


# --- the reference in a process of its own -------------------------------------------------
SHAPE_KEYS = ("teacher_layers", "student_layers", "hidden", "heads", "ffn", "vocab", "batch", "seq")


def separate_process_timer(args):
    """(one, record, close) like `step_timer`, with the reference running in a child process
    that never calls `runtime.keep_host_memory`, so its malloc is the system's: the
    reference as its users run it, while this process keeps its host memory. `one()` asks
    the child for one step and waits for it, so the steps can still be interleaved."""
    child = subprocess.Popen([sys.executable, "-m", "distil_jax.bench.torch_reference"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(line: str) -> str:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        reply = child.stdout.readline()
        if not reply:
            raise RuntimeError(f"the torch reference process stopped (exit code {child.wait()})")
        return reply.strip()

    ask(json.dumps({k: getattr(args, k) for k in SHAPE_KEYS}))

    def record(times) -> dict:
        return {**json.loads(ask("record " + json.dumps(list(times)))), "malloc": "system", "process": "separate"}

    def close():
        if child.poll() is None:
            child.stdin.close()
            child.wait(timeout=60)
    return (lambda: ask("step")), record, close


def _serve() -> None:
    """The child's side: the shape as the first line, then `step` (run one, reply with its
    seconds) and `record TIMES` (reply with the JSON record) until stdin closes."""
    args = types.SimpleNamespace(**json.loads(sys.stdin.readline()))
    one, record = step_timer(args)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("record "):
            print(json.dumps(record(json.loads(line[len("record "):]))), flush=True)
        else:
            start = time.perf_counter()
            one()
            print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    _serve()
