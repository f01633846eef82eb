"""Smoke test of the models and losses: a tiny random teacher, a student taken from it,
one masked batch through both, the triple loss, and a Hugging Face export.

    python -m distil_jax.main --config=configs/smoke.py --workdir=/tmp/distil_smoke

Runs offline in seconds on a CPU; prints the losses and writes WORKDIR/student_hf,
which `transformers.AutoModelForMaskedLM.from_pretrained` loads.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "smoke"
    c.teacher = ml_collections.ConfigDict(dict(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
        max_position_embeddings=128))
    c.student_layers = 2
    c.batch_size = 8
    c.seq_len = 64
    c.temperature = 2.0
    c.alpha_ce, c.alpha_mlm, c.alpha_cos = 5.0, 2.0, 1.0
    c.seed = 0
    return c
