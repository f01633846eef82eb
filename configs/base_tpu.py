"""configs/base.py (the paper's recipe) with the settings for Cloud TPU (v4, v5e, v5p).

    python -m distil_jax.main --config=configs/base_tpu.py --workdir=gs://BUCKET/distilbert
    (on every host of a slice: launch/tpu_vm.sh ... -- --config=configs/base_tpu.py)

What changes, and on what evidence (BENCHMARKS.md "GPU and TPU"):
- train.dtype / teacher.dtype bfloat16: the TPU's matrix units run bf16; float32 master
  weights, optimizer state and loss math. ASSUMED: no TPU was at hand, nothing of this
  config is measured on one (`bash benchmarks/tpu.sh` on one host is the check).
- Attention stays XLA's (train.attention ""): cuDNN does not exist on TPU, and XLA fuses
  the softmax there.
- The micro-batch stays configs/base.py's 256 sequences per micro-batch step (16 per chip
  on a v4-32's 16 chips).
"""

import os

from distil_jax.config import config_file


def get_config(corpora: str = ""):
    c = config_file(os.path.join(os.path.dirname(__file__), "base.py"), corpora)
    c.train.dtype = "bfloat16"
    c.teacher.dtype = "bfloat16"
    return c
