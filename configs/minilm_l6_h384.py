"""MiniLMv2-style L6 x H384: bert-base-uncased -> a 6-layer, 384-wide, 12-head student
trained on self-attention relations alone.

    python -m distil_jax.main --config=configs/minilm_l6_h384.py --workdir=gs://BUCKET/minilm

What is MiniLMv2's (Wang et al. 2021): a student of another width and head count (22M
parameters, of which about 11M outside the embeddings; 384 / 12 = 32 per head against
the teacher's 64), initialised randomly; the only loss is the multi-head self-attention
relation loss (Q-Q, K-K and V-V relations, KL(teacher || student)) between the
teacher's last layer (the base-size teacher's choice) and the student's last, with 12
relation heads (d_r = 64 for the teacher, 32 for the student); no projection, no
logits. What is not theirs: the corpus, schedule, batch and optimizer are this
project's DistilBERT recipe (configs/base.py: Wikipedia + BookCorpus, 3 epochs, 4K
batches, lr 5e-4); the KL-on-logits and MLM terms are kept at weight 0 (metrics only).

Sized like configs/base.py (a TPU v4-32 or 8 x A100/H100); the student step is cheap,
the teacher's forward is most of it. Expect, after fine-tuning, roughly the published
MiniLM figures for this shape: MNLI-m about 83 and SST-2 about 91 (MiniLM L6 x H384,
5.3x faster than BERT-base by its authors' measure; their teacher was UniLMv2), and a
6 x 768 MiniLMv2 student from BERT-base at MNLI-m 84.2. These cannot be run offline
here; `--config.mode=shapes` on configs/demo.py is the same comparison at small scale.
"""

import os

from distil_jax.config import config_file


def get_config():
    c = config_file(os.path.join(os.path.dirname(__file__), "base.py"))
    c.student.update(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, init="random")
    c.distill.update(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_mse=0.0,
                     layer_terms=(("relation",),), relation_heads=12)
    return c
