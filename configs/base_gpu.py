"""configs/base.py (the paper's recipe) with the settings for NVIDIA H100/H200 GPUs.

    python -m distil_jax.main --config=configs/base_gpu.py --workdir=gs://BUCKET/distilbert

What changes, and on what evidence (BENCHMARKS.md "GPU and TPU"):
- train.dtype / teacher.dtype bfloat16: bf16 compute, float32 master weights, optimizer
  state and loss math. ASSUMED: the bf16 step's speed and its ratio to float32 on a GPU are
  unmeasured (the one H200 lease ended in XLA's compile). Checked on CPU: the bf16 step's
  dtypes and its loss against float32 (tests/test_objective.py).
- train.attention cudnn: cuDNN flash attention wherever no dropout is applied to the
  probabilities (the teacher; the student only with attention_dropout 0), the key padding
  passed as lengths. ASSUMED: its speed and its agreement with XLA attention on a GPU are
  unmeasured (`python -m distil_jax.bench attention --dtype bfloat16` is the check).
- The micro-batch stays configs/base.py's 256 sequences per micro-batch step (32 per GPU on
  8); `python -m distil_jax.bench fit` gives the largest that fits (unmeasured).
Run `bash benchmarks/gpu.sh` on one GPU before a long run, and change these where it says so.
"""

import os

from distil_jax.config import config_file


def get_config(corpora: str = ""):
    c = config_file(os.path.join(os.path.dirname(__file__), "base.py"), corpora)
    c.train.dtype = "bfloat16"
    c.teacher.dtype = "bfloat16"
    c.train.attention = "cudnn"
    return c
