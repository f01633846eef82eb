"""A tiny distillation that runs anywhere in about a minute: the trainer's smoke config.

    python -m distil_jax.main --config=configs/tiny.py --workdir=/tmp/distil_tiny

A random 4-layer, 64-wide BERT teacher (teacher.path empty) is distilled into a
2-layer student on a synthetic corpus (a seeded Markov chain, no files). Expect the
total loss to fall over 30 updates and a checkpoint in WORKDIR/checkpoints; then
`--config.mode=eval` gives held-out metrics and `--config.mode=export` a Hugging Face
directory in WORKDIR/hf. With `--config.mode=pretrain` the same corpus trains the
BERT with MLM alone. The tests run this config with fewer steps.
"""

from distil_jax.config import defaults


def get_config():
    c = defaults()
    c.teacher.model.update(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4,
                           intermediate_size=128, max_position_embeddings=64)
    c.student.num_layers = 2
    c.data.source = "synthetic"
    c.data.seq_len = 32
    c.data.synthetic.num_sequences = 512
    c.train.update(steps=30, epochs=0, batch_size=32, micro_batch_size=16, learning_rate=1e-3,
                   seed=0, log_every=5)
    c.checkpoint.every_steps = 10
    c.eval.batches = 4
    return c
