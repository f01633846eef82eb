"""The paper's Table 4 at small scale: which parts of the triple loss matter (mode ablate).

    python -m distil_jax.main --config=configs/demo.py --workdir=DIR --config.mode=ablate

From the demo's corpus and teacher (its stages run first where DIR has none), students
of the demo's size and steps: the triple loss (the demo's own student); without L_ce;
without L_cos; without L_mlm; the triple loss from a random initialisation; and the
triple loss at temperatures 1 and 4 beside the default 2 (the paper discusses T, its
Table 4 does not vary it); `demo.ablations` names a subset. All are evaluated on the
same held-out masks; each row's
change against the triple loss comes with its paired standard error. Writes
DIR/ablation.md, DIR/ablation.json and DIR/ablation.png (training curves).
"""

from __future__ import annotations

import json
import os
from typing import Dict

import jax
from etils import epy

from distil_jax.apps import evaluate, stages
from distil_jax.checkpoint import load_model
from distil_jax.interop import hf

with epy.lazy_imports():  # only the plot needs it, and every start of main imports this module
    import matplotlib.figure

VARIANTS = (
    ("triple loss", {}),
    ("without L_ce", {"distill.alpha_ce": 0.0}),
    ("without L_cos", {"distill.alpha_cos": 0.0}),
    ("without L_mlm", {"distill.alpha_mlm": 0.0}),
    ("triple loss, random init", {"student.init": "random"}),
    ("triple loss, T = 1", {"distill.temperature": 1.0}),
    ("triple loss, T = 4", {"distill.temperature": 4.0}),
)
# Table 4 of the paper: change in GLUE macro score against the triple loss (None: not in it).
PAPER_GLUE_CHANGE = {"triple loss": 0.0, "without L_ce": -2.96, "without L_cos": -1.46,
                     "without L_mlm": -0.31, "triple loss, random init": -3.69}


def run(config, workdir: str) -> Dict:
    """Mode ablate: the variants trained (the demo's stages first when missing) and compared."""
    plan, clock = stages.start(config, workdir)
    stages.ensure_student("student", plan, clock)
    models, curves = {"teacher": hf.load_hf_model(plan.teacher_hf)}, {}
    chosen = set(config.demo.ablations) or {name for name, _ in VARIANTS}
    unknown = chosen - {name for name, _ in VARIANTS}
    if unknown:
        raise ValueError(f"demo.ablations names no variant {sorted(unknown)}; the variants: "
                         f"{[name for name, _ in VARIANTS]}")
    for name, changes in VARIANTS:
        if changes.get("distill.temperature") == plan.student_config.distill.temperature:
            continue  # the demo's own temperature is the triple loss row
        if name != "triple loss" and name not in chosen:
            continue
        cfg = stages.stage_config(plan.student_config, **changes)
        # The triple loss is the demo's own student: its run is reused.
        run_dir = plan.runs["student"][1] if not changes else os.path.join(workdir, "ablation", stages.slug(name))
        models[name] = load_model(stages.train_unless_finished(cfg, run_dir))[:2]
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f]

    found, _ = evaluate.compare_on_held_out(plan.student_config, workdir, models)
    results, pairs = found["models"], found["comparisons"]
    rows = []
    for name in curves:
        change = {"difference": 0.0, "se": 0.0} if name == "triple loss" else pairs[f"triple loss - {name}"]
        rows.append({"variant": name, "mlm_accuracy": results[name]["mlm_accuracy"],
                     "perplexity": results[name]["perplexity"],
                     "change_points": -100 * change["difference"], "change_se_points": 100 * change["se"],
                     "paper_glue_change": PAPER_GLUE_CHANGE.get(name)})
    table = format_table(rows, results["teacher"]["mlm_accuracy"], results["teacher"]["targets"])
    stages.write_outputs(workdir, {"ablation.md": table, "ablation.json": {"rows": rows, "teacher": results["teacher"]}},
                         show=table)
    if jax.process_index() == 0:
        plot_curves(curves, os.path.join(workdir, "ablation.png"))
    return {"rows": rows, "table": os.path.join(workdir, "ablation.md"),
            "plot": os.path.join(workdir, "ablation.png")}


def format_table(rows, teacher_accuracy: float, targets: int) -> str:
    cells = []
    for r in rows:
        paper = "" if r["paper_glue_change"] is None else f"{r['paper_glue_change']:+.2f}"
        change = "" if r["variant"] == "triple loss" else f"{r['change_points']:+.2f} ± {r['change_se_points']:.2f}"
        cells.append([r["variant"], f"{100 * r['mlm_accuracy']:.2f}", change, paper])
    cells.append(["(teacher)", f"{100 * teacher_accuracy:.2f}", "", ""])
    table = stages.markdown_table(["variant", "held-out MLM accuracy (%)", "change (points) ± paired s.e.",
                                   "paper: change in GLUE macro"], cells, right=(False, True, True, True))
    return table + f"\n\n{targets:,} held-out targets, the same for every row; standard errors clustered by sequence."


def plot_curves(curves: Dict[str, list], path: str) -> None:
    fig = matplotlib.figure.Figure(figsize=(11, 4))  # no pyplot: nothing global, no display needed
    axes = fig.subplots(1, 2)
    for name, records in curves.items():
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["loss_mlm"] for r in records], label=name)
        axes[1].plot(steps, [r.get("kl_t1") for r in records], label=name)
    axes[0].set(title="MLM loss (training batches)", xlabel="update", ylabel="cross-entropy")
    axes[1].set(title="KL(teacher || student) at T=1", xlabel="update", ylabel="nats per token")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
