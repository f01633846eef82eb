"""Students of another shape on the embedded default (mode shapes): which signals a narrow
student needs, and what cutting it from the teacher is worth.

    python -m distil_jax.main --config=configs/demo.py --workdir=DIR --config.mode=shapes

From the demo's corpus and teacher (its stages run first where DIR has none), a student
of half the teacher's width, heads and feed-forward size at the teacher's depth
(`demo.narrow`; a quarter of its non-embedding parameters), trained for the demo's
updates five ways:
  MLM only, random init             the baseline without a teacher
  logit KD + MLM, random init       the paper's L_ce + L_mlm (L_cos needs equal widths)
  + MiniLMv2 relations              Q-Q, K-K, V-V relations of the last layers
  + projected hidden MSE            TinyBERT's hidden-state MSE through a learned
                                    projection on every layer pair (0 = embeddings)
  prune init, <the best of those>   the same objective from the teacher pruned to the
                                    student's shape (student.init = prune)
All are evaluated on the same held-out masks beside the teacher and the demo's own
student (half the depth, the full width), fine-tuned on the demo's downstream task, and
timed; each comparison comes with its paired standard error. Writes DIR/shapes.md and
DIR/shapes.json.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple


from distil_jax.apps import evaluate, finetune, stages
from distil_jax.checkpoint import load_model
from distil_jax.interop import hf

LOGIT_KD = {"distill.alpha_cos": 0.0, "student.init": "random"}
RELATIONS = (("relation",),)
# The rows, in order; "prune init" takes the best objective of the KD rows.
MLM_ONLY, KD, KD_RELATIONS, KD_HIDDEN = ("MLM only, random init", "logit KD + MLM, random init",
                                         "+ MiniLMv2 relations", "+ projected hidden MSE")
HALF_DEPTH = "demo student: half depth, full width"


def narrow_sizes(config, teacher) -> Dict[str, int]:
    """demo.narrow with 0 resolved: the teacher's depth, half its width, heads, feed-forward."""
    n = config.demo.narrow
    return {"student.num_layers": n.num_layers or teacher.num_layers,
            "student.hidden_size": n.hidden_size or teacher.hidden_size // 2,
            "student.num_heads": n.num_heads or max(1, teacher.num_heads // 2),
            "student.intermediate_size": n.intermediate_size or teacher.intermediate_size // 2}


def hidden_pairs(teacher_layers: int, student_layers: int) -> Tuple[Tuple, ...]:
    """TinyBERT's uniform map for the hidden-state terms: student layer m <- teacher layer
    m x T / S, the embeddings (0) onto the embeddings."""
    return tuple(("hidden_mse", round(m * teacher_layers / student_layers), m) for m in range(student_layers + 1))


def variants(config, teacher) -> Dict[str, dict]:
    """Row name -> the config changes of its run (the prune row is added by `run`)."""
    sizes = narrow_sizes(config, teacher)
    pairs = hidden_pairs(teacher.num_layers, sizes["student.num_layers"])
    return {
        MLM_ONLY: {**sizes, **stages.MLM_ONLY, "student.init": "random"},
        KD: {**sizes, **LOGIT_KD},
        KD_RELATIONS: {**sizes, **LOGIT_KD, "distill.layer_terms": RELATIONS},
        KD_HIDDEN: {**sizes, **LOGIT_KD, "distill.layer_terms": RELATIONS + pairs},
    }


def _train(plan, workdir: str, name: str, changes: dict) -> str:
    """The row's run directory, trained unless it is finished."""
    return stages.train_unless_finished(stages.stage_config(plan.student_config, **changes),
                                        os.path.join(workdir, "shapes", stages.slug(name)))


def run(config, workdir: str) -> Dict:
    """Mode shapes: the rows trained (the demo's stages first when missing), compared."""
    plan, clock = stages.start(config, workdir)
    teacher = hf.load_hf_model(plan.teacher_hf)
    sources = {"teacher": plan.teacher_hf, HALF_DEPTH: stages.ensure_student("student", plan, clock)}
    models = {"teacher": teacher, HALF_DEPTH: hf.load_hf_model(sources[HALF_DEPTH])}
    rows = variants(config, teacher[0].config)
    for name, changes in rows.items():
        sources[name] = _train(plan, workdir, name, changes)
        models[name] = load_model(sources[name])[:2]
    # The prune row takes the best KD objective (held-out accuracy) of the random-init rows.
    kd_rows = (KD, KD_RELATIONS, KD_HIDDEN)
    found, _ = evaluate.compare_on_held_out(plan.student_config, workdir, {n: models[n] for n in kd_rows}, reference=None)
    best = max(kd_rows, key=lambda n: found["models"][n]["mlm_accuracy"])
    pruned = f"prune init, {best.lstrip('+ ') if best != KD else 'logit KD + MLM'}"
    rows[pruned] = {**rows[best], "student.init": "prune"}
    sources[pruned] = _train(plan, workdir, pruned, rows[pruned])
    models[pruned] = load_model(sources[pruned])[:2]
    found, batches = evaluate.compare_on_held_out(plan.student_config, workdir, models)

    timing = batches[: config.demo.inference_batches]
    seconds = {n: evaluate.inference_seconds(m, p, timing) for n, (m, p) in models.items()}
    tuned = finetune.finetune_models(config, workdir, sources, task_kd=False) if finetune.finetunes(config) else {}
    results, pairs = found["models"], found["comparisons"]
    table = []
    for name, (module, params) in models.items():
        r = results[name]
        table.append({"model": name, "layers": module.config.num_layers, "width": module.config.hidden_size,
                      "heads": module.config.num_heads, "parameters": stages.count_parameters(params),
                      "non_embedding_parameters": stages.count_parameters(params["encoder"]),
                      "mlm_accuracy": r["mlm_accuracy"], "perplexity": r["perplexity"],
                      "agreement": r.get("agreement_with_teacher"),
                      "finetune_accuracy": tuned.get("models", {}).get(name, {}).get("accuracy"),
                      "speedup": seconds["teacher"] / max(seconds[name], 1e-9)})
    wanted = [(KD_RELATIONS, KD), (KD_HIDDEN, KD), (KD, MLM_ONLY), (pruned, best)]
    comparisons = {f"{a} - {b}": evaluate.pair(pairs, a, b) for a, b in wanted}
    finetune_pairs = {f"{a} - {b}": evaluate.pair(tuned["comparisons"], a, b) for a, b in wanted} if tuned else {}
    out = {"rows": table, "comparisons": comparisons, "finetune_comparisons": finetune_pairs,
           "best_objective": best, "held_out_targets": results["teacher"]["targets"],
           "finetune_task": tuned.get("task"), "updates": plan.student_config.train.steps}
    text = format_table(out)
    stages.write_outputs(workdir, {"shapes.md": text, "shapes.json": out}, show=text)
    return {"table": os.path.join(workdir, "shapes.md"), "comparisons": comparisons}


def format_table(out: Dict) -> str:
    pct = lambda x: "" if x is None else f"{100 * x:.2f}"  # noqa: E731
    models = [[r["model"], f"{r['layers']} x {r['width']} ({r['heads']})",
               f"{r['parameters']:,} ({r['non_embedding_parameters']:,})", pct(r["mlm_accuracy"]),
               f"{r['perplexity']:.2f}", pct(r["agreement"]) if r["model"] != "teacher" else "",
               pct(r["finetune_accuracy"]), f"{r['speedup']:.2f}x"] for r in out["rows"]]
    pairs = []
    for name, c in out["comparisons"].items():
        f = out["finetune_comparisons"].get(name)
        pairs.append([name, f"{100 * c['difference']:+.2f} ± {100 * c['se']:.2f}",
                      "" if f is None else f"{100 * f['difference']:+.2f} ± {100 * f['se']:.2f}"])
    lines = [stages.markdown_table(
        ["model", "layers x width (heads)", "parameters (non-embedding)", "held-out MLM accuracy (%)", "perplexity",
         "agreement with teacher (%)", "fine-tuned accuracy (%)", "speed-up vs teacher"], models,
        right=(False, False) + (True,) * 6), "",
        stages.markdown_table(["comparison", "held-out MLM accuracy, points ± paired s.e.",
                               "fine-tuned accuracy, points ± paired s.e."], pairs, right=(False, True, True))]
    by_name = {r["model"]: r for r in out["rows"]}
    per_param = lambda r: 100 * r["mlm_accuracy"] / (r["parameters"] / 1e6)  # noqa: E731
    best = max((r for r in out["rows"] if r["model"] not in ("teacher", HALF_DEPTH)), key=lambda r: r["mlm_accuracy"])
    lines.append("")
    lines.append(f"{out['held_out_targets']:,} held-out targets, the same for every row; standard errors "
                 f"clustered by sequence; {out['updates']} updates per student. Accuracy points per million "
                 f"parameters: best narrow ({best['model']}) {per_param(best):.2f}, {HALF_DEPTH} "
                 f"{per_param(by_name[HALF_DEPTH]):.2f}.")
    return "\n".join(lines)

