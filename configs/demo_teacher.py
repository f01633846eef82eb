"""The embedded demo's teacher: pretrained once, shipped with the package.

    python -m distil_jax.main --config=configs/demo_teacher.py --workdir=/tmp/demo_teacher

A 4-layer, 256-wide BERT (vocabulary 4096, a WordPiece trained on the embedded corpus's
training split) pretrained with MLM on the embedded corpus, far longer than the demo's
15 minutes allow. See distil_jax/assets/demo_teacher/README.md for what it gave.
"""

from distil_jax.config import defaults


def get_config():
    c = defaults()
    c.mode = "pretrain"
    c.teacher.model.update(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4,
                           intermediate_size=1024, max_position_embeddings=128)
    c.data.update(source="corpus", seq_len=128, length_buckets=(32, 64, 96, 128))
    c.data.sources = {"embedded": {"kind": "embedded", "weight": 1.0}}
    c.masking.smoothing = 0.0
    c.train.update(steps=7000, epochs=0, batch_size=64, micro_batch_size=64, seed=0, log_every=100,
                   learning_rate=1e-3, warmup_fraction=0.05, weight_decay=0.01, grad_clip=1.0)
    c.checkpoint.update(every_steps=500, keep=100)
    return c
