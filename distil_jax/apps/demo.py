"""The embedded default, end to end (mode demo): the whole DistilBERT story on a CPU.

    python -m distil_jax.main --config=configs/demo.py --workdir=DIR

Stages, each in its own place in DIR and skipped when already done:
  data/                  the embedded corpus prepared with the teacher's tokenizer
  (teacher)              demo.teacher: "shipped" (default) is the BERT this project pretrained
                         once on the embedded corpus and ships in the package
                         (distil_jax/assets/demo_teacher, its card says how); "train"
                         pretrains one here (teacher/, teacher/hf: demo.teacher_train);
                         or the path of a Hugging Face directory
  student/, student_hf/  a student of half the teacher's layers, initialised from it,
                         distilled with the triple loss, exported for Hugging Face
  student_mlm_only/, student_mlm_only_hf/
                         the same student trained with the MLM loss alone, same steps
  eval.json              teacher, students and the most-frequent-token baseline on the same
                         held-out masks, each pair's difference with its paired standard
                         error; inference time of teacher and student
  finetune/NAME/, finetune.json
                         the three fine-tuned on which-package-is-this-docstring-from
                         (mode finetune's runs), and the student again with task
                         distillation from the fine-tuned teacher (student_task_kd)
  examples.json          held-out sentences with a word masked: each model's top guesses
  summary.json           all of it, plus parameter counts and each stage's wall time
To re-run a stage, delete its directory or file (and those of the stages after it).
"""

from __future__ import annotations

import os
import re
import time
from typing import Dict, List

import numpy as np

from distil_jax.apps import evaluate, finetune, stages
from distil_jax.data.sources import EmbeddedSource
from distil_jax.data.tokenizer import load_tokenizer
from distil_jax.interop import hf

MODELS = ("teacher", "student", "student_mlm_only")
# Fill-mask probes shown before the held-out sentences (the first is the README's).
PROBES = ("Return the [MASK] of the list.", "Raise an exception if the file does not [MASK].")


def run(config, workdir: str) -> Dict:
    """Mode demo: every stage (skipped when done); prints the tables, writes summary.json."""
    began = time.perf_counter()
    plan, clock = stages.start(config, workdir)
    dirs = {"teacher": plan.teacher_hf, **{name: stages.ensure_student(name, plan, clock) for name in plan.runs}}
    models = {name: hf.load_hf_model(path) for name, path in dirs.items()}
    tokenizer = load_tokenizer(os.path.join(plan.data_dir, "tokenizer"))

    evaluation = stages.cached(os.path.join(workdir, "eval.json"), clock, "evaluate",
                         lambda: _evaluate(plan.student_config, workdir, models))
    finetuned = stages.cached(os.path.join(workdir, "finetune.json"), clock, "finetune",
                        lambda: finetune.finetune_models(config, workdir, dirs) if finetune.finetunes(config) else {})
    examples = stages.cached(os.path.join(workdir, "examples.json"), clock, "examples",
                       lambda: fill_mask_examples(tokenizer, models, config.demo.examples, config.train.seed))
    summary = _summary(evaluation, finetuned, examples, clock.times, dirs, config)
    summary["wall_seconds_this_run"] = round(time.perf_counter() - began, 1)
    stages.write_outputs(workdir, {"summary.json": summary}, show=format_summary(summary))
    return {k: summary[k] for k in ("teacher_mlm_accuracy", "student_mlm_accuracy", "retention",
                                    "student_mlm_only_accuracy", "distillation_gain") if k in summary}


def _evaluate(student_config, workdir, models) -> Dict:
    found, batches = evaluate.compare_on_held_out(student_config, workdir, models)
    timing = batches[: student_config.demo.inference_batches]
    seconds = {name: evaluate.inference_seconds(models[name][0], models[name][1], timing)
               for name in ("teacher", "student")}
    return {**found, "parameters": {n: stages.count_parameters(p) for n, (_, p) in models.items()},
            "inference_seconds": seconds, "inference_sequences": int(sum(len(b["input_ids"]) for b in timing))}


# --- what a newcomer sees: fill-mask examples ------------------------------------------------
def example_sentences(tokenizer, count: int, seed: int) -> List[Dict[str, str]]:
    """`count` held-out docstring sentences (6 to 14 plain words), each with one word masked:
    a word of 4+ letters, not the first, that is one token of the vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.get_vocab()
    found = []
    for doc in EmbeddedSource().documents("eval"):
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            words = sentence.split()
            if not 6 <= len(words) <= 14 or not re.fullmatch(r"[A-Za-z ,.'()-]+", sentence):
                continue
            candidates = [i for i, w in enumerate(words[1:], 1)
                          if re.fullmatch(r"[A-Za-z]{4,}", w) and w.lower() in vocab]
            if candidates:
                found.append((sentence, candidates))
    picks = rng.choice(len(found), size=min(count, len(found)), replace=False) if found else []
    out = []
    for k in sorted(picks):
        sentence, candidates = found[k]
        words = sentence.split()
        i = int(rng.choice(candidates))
        out.append({"text": " ".join(words[:i] + [tokenizer.mask_token] + words[i + 1:]), "answer": words[i].lower()})
    return out


def fill_mask_examples(tokenizer, models, count: int, seed: int, top_k: int = 3) -> List[Dict]:
    """Each model's top-k tokens at the [MASK] of the probes and of held-out sentences."""
    cases = [{"text": p, "answer": ""} for p in PROBES] + example_sentences(tokenizer, count, seed)
    forwards = {name: evaluate.jitted_logits(module) for name, (module, _) in models.items()}
    rows = []
    for case in cases:
        enc = tokenizer(case["text"], return_tensors="np")
        pad = -enc["input_ids"].shape[1] % 32  # a few lengths only: a few compilations
        ids = np.pad(enc["input_ids"], [(0, 0), (0, pad)], constant_values=tokenizer.pad_token_id).astype(np.int32)
        am = np.pad(enc["attention_mask"], [(0, 0), (0, pad)]).astype(np.int32)
        position = int(np.flatnonzero(ids[0] == tokenizer.mask_token_id)[0])
        row = {**case}
        for name, (_, params) in models.items():
            logits = np.asarray(forwards[name](params, ids, am)[0, position])
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-logits)[:top_k]
            row[name] = [[tokenizer.convert_ids_to_tokens(int(t)), round(float(probs[t]), 3)] for t in top]
        rows.append(row)
    return rows


# --- the summary ---------------------------------------------------------------------------
def _summary(evaluation, finetuned, examples, stages, dirs, config) -> Dict:
    m = evaluation["models"]
    t, s = m["teacher"], m["student"]
    secs = evaluation["inference_seconds"]
    summary = {
        "teacher": config.demo.teacher, "teacher_hf": dirs["teacher"], "student_hf": dirs["student"],
        "teacher_parameters": evaluation["parameters"]["teacher"],
        "student_parameters": evaluation["parameters"]["student"],
        "teacher_mlm_accuracy": t["mlm_accuracy"], "student_mlm_accuracy": s["mlm_accuracy"],
        "teacher_perplexity": t["perplexity"], "student_perplexity": s["perplexity"],
        "retention": s["mlm_accuracy"] / max(t["mlm_accuracy"], 1e-9),
        "agreement": s["agreement_with_teacher"], "kl_teacher_student": s["kl_from_teacher"],
        "most_frequent_token_accuracy": evaluation["most_frequent_token"]["mlm_accuracy"],
        "teacher_inference_s": secs["teacher"], "student_inference_s": secs["student"],
        "speedup": secs["teacher"] / max(secs["student"], 1e-9),
        "inference_sequences": evaluation["inference_sequences"], "held_out_targets": t["targets"],
        "comparisons": evaluation["comparisons"],
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "demo_seconds": round(sum(v["seconds"] for v in stages.values()), 1),
        "examples": examples,
    }
    if "student_mlm_only" in m:
        o = m["student_mlm_only"]
        gain = evaluation["comparisons"]["student - student_mlm_only"]
        summary.update(student_mlm_only_accuracy=o["mlm_accuracy"], student_mlm_only_perplexity=o["perplexity"],
                       student_mlm_only_kl_teacher=o["kl_from_teacher"],
                       student_mlm_only_agreement=o["agreement_with_teacher"],
                       distillation_gain=gain["difference"], distillation_gain_se=gain["se"])
    if finetuned.get("models"):
        summary["finetune_task"] = f"{finetuned['task']} ({len(finetuned['classes'])} classes, " \
                                   f"{finetuned['held_out']} held out)"
        for name, scores in finetuned["models"].items():
            summary[f"{name}_finetune_accuracy"] = scores["accuracy"]
        summary["finetune_comparisons"] = finetuned["comparisons"]
        if "student_task_kd" in finetuned["models"]:
            gain = evaluate.pair(finetuned["comparisons"], "student_task_kd", "student")
            summary.update(task_distillation_gain=gain["difference"], task_distillation_gain_se=gain["se"])
    return summary


def _points(x: float) -> str:
    return f"{100 * x:.2f}"


def format_summary(s: Dict) -> str:
    names = [n for n in MODELS if n != "student_mlm_only" or "student_mlm_only_accuracy" in s]
    heads = {"teacher": "teacher", "student": "distilled", "student_mlm_only": "MLM only"}
    rows = []
    acc = {"teacher": s["teacher_mlm_accuracy"], "student": s["student_mlm_accuracy"],
           "student_mlm_only": s.get("student_mlm_only_accuracy")}
    ppl = {"teacher": s["teacher_perplexity"], "student": s["student_perplexity"],
           "student_mlm_only": s.get("student_mlm_only_perplexity")}
    rows.append(["parameters", f"{s['teacher_parameters']:,}"] + [f"{s['student_parameters']:,}"] * (len(names) - 1))
    rows.append(["held-out MLM accuracy (%)"] + [_points(acc[n]) for n in names])
    rows.append(["held-out perplexity"] + [f"{ppl[n]:.2f}" for n in names])
    if "teacher_finetune_accuracy" in s:
        rows.append([f"fine-tuned: {s['finetune_task']} (%)"] +
                    [_points(s[f"{n}_finetune_accuracy"]) for n in names if f"{n}_finetune_accuracy" in s])
    rows = [r + [""] * (len(names) + 1 - len(r)) for r in rows]
    lines = [stages.markdown_table([""] + [heads[n] for n in names], rows, right=[False] + [True] * len(names)), ""]
    lines.append(f"{s['held_out_targets']:,} held-out targets; retention (distilled / teacher accuracy) "
                 f"{s['retention']:.1%}; top-1 agreement with the teacher {s['agreement']:.1%}; "
                 f"inference {s['speedup']:.2f}x faster ({s['inference_sequences']} sequences)")
    if "distillation_gain" in s:
        lines.append(f"distilled - MLM only: {100 * s['distillation_gain']:+.2f} points "
                     f"(paired standard error {100 * s['distillation_gain_se']:.2f}, clustered by sequence)")
    if "finetune_comparisons" in s and "student - student_mlm_only" in s["finetune_comparisons"]:
        c = s["finetune_comparisons"]["student - student_mlm_only"]
        lines.append(f"fine-tuned, distilled - MLM only: {100 * c['difference']:+.2f} points "
                     f"(paired standard error {100 * c['se']:.2f})")
    if "task_distillation_gain" in s:
        lines.append(f"fine-tuned with task distillation from the fine-tuned teacher: "
                     f"{_points(s['student_task_kd_finetune_accuracy'])}%, "
                     f"{100 * s['task_distillation_gain']:+.2f} points over the distilled student fine-tuned "
                     f"alone (paired standard error {100 * s['task_distillation_gain_se']:.2f})")
    lines.append(f"always the most frequent token: {_points(s['most_frequent_token_accuracy'])}%")
    lines.append("")
    lines.append("Fill in the [MASK] (top 3 of each model, with probabilities):")
    for e in s["examples"]:
        answer = f"  (held out: {e['answer']})" if e["answer"] else ""
        lines.append(f"  {e['text']}{answer}")
        for n in names:
            guesses = ", ".join(f"{tok} {p:.2f}" for tok, p in e[n])
            lines.append(f"      {heads[n]:>9}: {guesses}")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["stage_seconds"].items()))
    lines.append(f"student for Hugging Face: {s['student_hf']}")
    return "\n".join(lines)
