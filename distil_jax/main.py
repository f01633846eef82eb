"""Entry point: `python -m distil_jax.main --config=configs/FILE.py --workdir=DIR`.

Parses the ml_collections config (overrides with --config.a.b=value) and dispatches on
`config.mode`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def smoke(config, workdir: str) -> dict:
    """One masked batch through a tiny teacher and the student taken from it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from distil_jax import hf, losses, masking
    from distil_jax.models import Bert, BertConfig, DistilBert, init_params
    from distil_jax.student_init import init_student_from_teacher, student_config_from_teacher

    t_config = BertConfig(**config.teacher)
    teacher = Bert(t_config)
    t_params = init_params(teacher, jax.random.key(config.seed))
    s_config = student_config_from_teacher(t_config, num_layers=config.student_layers)
    student = DistilBert(s_config)
    s_params = init_student_from_teacher(t_params, t_config, s_config)

    rng = np.random.default_rng(config.seed)
    special = (0, 1, 2, 3)  # [PAD] [CLS] [SEP] [MASK] in this random vocabulary
    ids = rng.integers(len(special), t_config.vocab_size, (config.batch_size, config.seq_len))
    lengths = rng.integers(12, config.seq_len + 1, config.batch_size)
    am = (np.arange(config.seq_len)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(am == 1, ids, 0).astype(np.int32)
    probs = masking.token_probs_from_counts(np.ones(t_config.vocab_size), 0.7, special)
    masked, labels, targets = masking.mask_tokens(
        jax.random.key(1), ids, am, probs, special, 3, t_config.vocab_size)

    t_out = teacher.apply({"params": t_params}, masked, am)
    s_out = student.apply({"params": s_params}, masked, am)
    terms = {
        "loss_ce": losses.kd_loss(s_out.logits, t_out.logits, am, config.temperature),
        "loss_mlm": losses.mlm_loss(s_out.logits, labels, targets),
        "loss_cos": losses.cosine_loss(s_out.last_hidden_state, t_out.last_hidden_state, am),
    }
    terms["loss"] = (config.alpha_ce * terms["loss_ce"] + config.alpha_mlm * terms["loss_mlm"]
                     + config.alpha_cos * terms["loss_cos"])
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    result = {k: float(v) for k, v in terms.items()}
    result.update(teacher_params=count(t_params), student_params=count(s_params),
                  targets=int(targets.sum()), real_tokens=int(am.sum()),
                  student_hf=hf.save_student_hf(s_params, s_config, os.path.join(workdir, "student_hf")))
    return result


def main(argv):
    del argv
    config, workdir = FLAGS.config, FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    if config.mode == "smoke":
        result = smoke(config, workdir)
        logging.info("smoke: %s", result)
        print(json.dumps(result, indent=2))
    else:
        raise app.UsageError(f"config.mode {config.mode!r} is not one of: smoke")


if __name__ == "__main__":
    app.run(main)
