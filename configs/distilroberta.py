"""DistilRoBERTa: roberta-base -> 6 layers, DistilBERT's recipe on OpenWebText.

    python -m distil_jax.main --config=configs/distilroberta.py --workdir=gs://BUCKET/distilroberta --config.mode=prepare
    python -m distil_jax.main --config=configs/distilroberta.py --workdir=gs://BUCKET/distilroberta

The published distilroberta-base (Hugging Face model card): "the same training procedure
as DistilBERT" with roberta-base as teacher, on OpenWebTextCorpus (a reproduction of
OpenAI's WebText, about 4x less data than RoBERTa's); 6 layers of width 768 and 12 heads,
82M parameters against roberta-base's 125M, on average twice as fast. GLUE test: MNLI
84.0, QQP 89.4, QNLI 90.8, SST-2 92.5, CoLA 59.3, STS-B 88.3, MRPC 86.6, RTE 67.9.

Here: configs/base.py (the paper's triple loss, T = 2, alpha_ce 5 / alpha_mlm 2 /
alpha_cos 1, batches of 4096, lr 5e-4, 3 epochs) with teacher `roberta-base` and its
byte-level BPE tokenizer (<s> </s> <mask>, padding id 1, positions counted from 2), a
case-sensitive corpus (no lowercasing), and a student of RoBERTa's own layout with teacher
layers 0, 2, 4, 7, 9, 11: it exports as RobertaForMaskedLM, DistilRoBERTa's layout.
`--config=configs/distilroberta.py:DIR` reads Parquet copies of OpenWebText under DIR
(DIR/openwebtext/*.parquet) instead of streaming the hub's.
"""

import os

from distil_jax.config import config_file


def get_config(corpora: str = ""):
    c = config_file(os.path.join(os.path.dirname(__file__), "base.py"), corpora)
    c.teacher.path = "roberta-base"
    c.data.lowercase = False  # RoBERTa's BPE is case-sensitive
    # 8.0M web documents, one row each (column text); 1% held out by content hash.
    c.data.sources = {
        "openwebtext": ({"kind": "datasets", "path": "Skylion007/openwebtext", "split": "train"} if not corpora else
                        {"kind": "parquet", "files": f"{corpora}/openwebtext/*.parquet"})
                       | {"text_key": "text", "eval_percent": 1, "weight": 1.0},
    }
    return c
