"""The embedded demo's teacher: pretrained once, shipped with the package.

    python -m distil_jax.main --config=configs/demo_teacher.py --workdir=/tmp/demo_teacher
    python -m distil_jax.main --config=configs/demo_teacher.py --workdir=/tmp/demo_teacher \
        --config.mode=export --config.export.dtype=bfloat16 --config.export.dir=distil_jax/assets/demo_teacher

configs/demo.py's 4-layer, 256-wide BERT (vocabulary 4096, a WordPiece trained on the
embedded corpus's training split) pretrained with MLM on that corpus by
`demo.teacher_train` (batches of 64, peak learning rate 1e-3, 5% warmup, weight
decay 0.01, clipping at 1; uniform masking) for 7000 updates, about two hours on 2 CPU cores; the second
command writes what ships in distil_jax/assets/demo_teacher, whose README.md (the card)
gives what it scores. `python -m distil_jax.main --config=configs/demo.py
--config.demo.teacher=train` runs the same recipe inside the demo.
"""

import os

from distil_jax.config import config_file, stage_train, with_changes


def get_config():
    demo = config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    c = stage_train(with_changes(demo, mode="pretrain"), "demo.teacher_train")  # what demo.teacher=train runs
    c.train.log_every = 100
    c.checkpoint.update(every_steps=500, keep=100)
    return c
