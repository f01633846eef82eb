"""The embedded default: the whole DistilBERT story, offline, on a laptop CPU.

    python -m distil_jax.main --config=configs/demo.py --workdir=/tmp/distil_demo

The standard library's docstrings and pydoc topics are the corpus. The teacher is the
4-layer BERT this project pretrained on it for two hours (configs/demo_teacher.py) and
ships in the package (distil_jax/assets/demo_teacher); `--config.demo.teacher=train`
pretrains one here by the same recipe instead (demo.teacher_train, 7000 updates as shipped). A 2-layer student initialised from teacher layers 0
and 3 is distilled with the triple loss, and the same student is trained with MLM alone
for comparison; all three are evaluated on the same held-out masks (every held-out
token a target once, paired standard errors), fine-tuned on
which-package-is-this-docstring-from, and shown filling in masked held-out sentences.
Prints the tables and writes WORKDIR/summary.json; sized for 2 CPU cores and 15
minutes. The README has the figures of a full run; `--config.mode=ablate` on the same
workdir gives the paper's Table 4 at this scale.

Masking is uniform here (masking.smoothing = 0): the paper's 0.7 favours rare tokens,
which on a 540K-token corpus with a vocabulary trained on it are mostly subwords seen
once. The KL covers the masked positions only (distill.restrict_ce_to_mask): on a corpus
this small the all-tokens KL spends most of its weight teaching the student to copy the
visible tokens; it also projects only those rows onto the vocabulary.
"""

from distil_jax.config import defaults


def get_config():
    c = defaults()
    c.mode = "demo"
    # The shipped teacher's architecture (what demo.teacher=train pretrains).
    c.teacher.model.update(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4,
                           intermediate_size=1024, max_position_embeddings=128)
    c.student.num_layers = 2
    c.data.update(source="corpus", seq_len=128, length_buckets=(32, 64, 96, 128))
    c.data.sources = {"embedded": {"kind": "embedded", "weight": 1.0}}
    c.masking.smoothing = 0.0
    c.distill.restrict_ce_to_mask = True
    c.train.update(steps=0, epochs=0, batch_size=32, micro_batch_size=32, seed=0, log_every=50,
                   warmup_fraction=0.1)
    c.checkpoint.every_steps = 200
    c.eval.update(batches=0, batch_size=32)  # the whole held-out split, 7 passes
    c.demo.update(teacher="shipped", inference_batches=8, examples=6)
    c.demo.teacher_train.steps = 7000  # the shipped teacher's recipe: configs/demo_teacher.py
    c.demo.student_train.update(steps=500, learning_rate=1e-3)
    c.finetune.update(classes=6, max_len=64)
    c.finetune.train.update(epochs=2, learning_rate=2e-4)
    return c
