"""`python -m distil_jax.bench vocab`: what `student.vocab=prune` saves for an XLM-R-shaped
teacher on the embedded corpus.

XLM-R base's architecture (250,002 ids, 12 x 768) as the teacher, its 6-layer student
(a RoBERTa of its own layout); the vocabulary a SentencePiece Unigram trained on the
embedded corpus itself, standing in for XLM-R's (which is not on the machine): every id
the corpus gives under it is kept, with the specials, and teacher and student are counted
before and after, from the models' shapes (vocab_prune.parameter_counts).
"""

from __future__ import annotations

import time
from typing import Dict

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from distil_jax.data import vocab_prune
from distil_jax.data.sources import embedded_documents

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's order: <pad> = 1


def add_flags(p) -> None:
    p.add_argument("--pieces", type=int, default=250002, help="the Unigram's target size (it stops at the "
                   "pieces the corpus supports)")
    p.add_argument("--student_layers", type=int, default=6)


def run(args) -> Dict:
    docs = list(embedded_documents())
    start = time.perf_counter()
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(docs, trainers.UnigramTrainer(vocab_size=args.pieces, special_tokens=SPECIALS,
                                                          unk_token="<unk>"))
    seen = np.unique(np.concatenate([np.asarray(e.ids, np.int64) for e in tok.encode_batch(docs)]))
    teacher = vocab_prune.xlmr_base_config()
    kept = vocab_prune.kept_vocab(seen, teacher.vocab_size, {t: tok.token_to_id(t) for t in SPECIALS})
    counts = vocab_prune.parameter_counts(teacher, kept, student_layers=args.student_layers)
    return {"bench": "vocab", "documents": len(docs), "characters": sum(map(len, docs)),
            "tokenizer_pieces": tok.get_vocab_size(), "seconds": round(time.perf_counter() - start, 2), **counts,
            "teacher_pruned_fraction": round(counts["teacher_pruned"] / counts["teacher"], 4),
            "student_pruned_fraction": round(counts["student_pruned"] / counts["student"], 4)}
