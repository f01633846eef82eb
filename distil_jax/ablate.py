"""The paper's Table 4 at small scale: which parts of the triple loss matter.

    python -m distil_jax.ablate --config=configs/demo.py --workdir=DIR

From the demo's corpus and teacher (prepared and pretrained first if DIR has none), five
students of the demo's size and steps: the triple loss; without L_ce; without L_cos;
without L_mlm; the triple loss from a random initialisation. All are evaluated on the
same held-out masks. Writes DIR/ablation.md (held-out MLM accuracy, change against the
triple loss, the paper's change in GLUE macro score), DIR/ablation.json and
DIR/ablation.png (training loss curves).
"""

from __future__ import annotations

import json
import os
from typing import Dict

VARIANTS = (
    ("triple loss", {}),
    ("without L_ce", {"distill.alpha_ce": 0.0}),
    ("without L_cos", {"distill.alpha_cos": 0.0}),
    ("without L_mlm", {"distill.alpha_mlm": 0.0}),
    ("triple loss, random init", {"student.init": "random"}),
)
# Table 4 of the paper: change in GLUE macro score against the triple loss.
PAPER_GLUE_CHANGE = {"triple loss": 0.0, "without L_ce": -2.96, "without L_cos": -1.46,
                     "without L_mlm": -0.31, "triple loss, random init": -3.69}


def _slug(name: str) -> str:
    return name.replace(",", "").replace(" ", "_").lower()


def run_ablation(config, workdir: str) -> Dict:
    from distil_jax import demo, evaluate, hf, train
    plan = demo.make_plan(config, workdir)
    demo.ensure_teacher(plan, demo.StageClock(os.path.join(workdir, "stages.json")))
    models, curves = {"teacher": hf.load_hf_model(plan.teacher_hf)}, {}
    for name, changes in VARIANTS:
        cfg = demo.stage_config(plan.student, **changes)
        # The triple loss is the demo's own student: its run is reused when there.
        run_dir = plan.student_dir if not changes else os.path.join(workdir, "ablation", _slug(name))
        train.train_and_evaluate(cfg, run_dir)
        run = train.make_run(cfg, run_dir, split="eval")
        models[name] = (run.exp.model, train.restore_params(run)[0])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f]

    results, _ = evaluate.compare_on_held_out(plan.student, workdir, models)
    base = results["triple loss"]["mlm_accuracy"]
    rows = [{"variant": name, "mlm_accuracy": results[name]["mlm_accuracy"],
             "perplexity": results[name]["perplexity"],
             "change_points": 100 * (results[name]["mlm_accuracy"] - base),
             "paper_glue_change": PAPER_GLUE_CHANGE[name]} for name, _ in VARIANTS]
    table = format_table(rows, results["teacher"]["mlm_accuracy"])
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
        json.dump({"rows": rows, "teacher": results["teacher"]}, f, indent=2)
    plot_curves(curves, os.path.join(workdir, "ablation.png"))
    print(table, flush=True)
    return {"rows": rows, "table": os.path.join(workdir, "ablation.md"),
            "plot": os.path.join(workdir, "ablation.png")}


def format_table(rows, teacher_accuracy: float) -> str:
    lines = ["| variant | held-out MLM accuracy | change (points) | paper: change in GLUE macro |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {100 * r['mlm_accuracy']:.2f} | {r['change_points']:+.2f} | "
                     f"{r['paper_glue_change']:+.2f} |")
    lines.append(f"| (teacher) | {100 * teacher_accuracy:.2f} | | |")
    return "\n".join(lines)


def plot_curves(curves: Dict[str, list], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in curves.items():
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["loss_mlm"] for r in records], label=name)
        axes[1].plot(steps, [r["kl_t1"] for r in records], label=name)
    axes[0].set(title="MLM loss (training batches)", xlabel="update", ylabel="cross-entropy")
    axes[1].set(title="KL(teacher || student) at T=1", xlabel="update", ylabel="nats per token")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    from absl import flags

    from distil_jax import hostmem
    hostmem.keep_host_memory()
    result = run_ablation(flags.FLAGS.config, flags.FLAGS.workdir)
    print(json.dumps({k: result[k] for k in ("table", "plot")}, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the demo's stages and the ablation's runs.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
