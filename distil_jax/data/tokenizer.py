"""Tokenizers: a teacher's (Hugging Face fast tokenizer) or a WordPiece trained on the corpus.

Whatever the origin, the result is a `transformers.PreTrainedTokenizerFast` saved next to
every prepared dataset and every export, so `AutoTokenizer.from_pretrained` loads it, and
identified by a hash of its vocabulary and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

from etils import epy
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from distil_jax.data.types import DataError

with epy.lazy_imports():  # heavy (it imports torch); a run on synthetic data never needs it
    import transformers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 when trained here


def says_how_to_normalise(path: str) -> bool:
    """Whether a tokenizer directory records its own casing (tokenizer.json or tokenizer_config.json);
    a bare vocab.txt does not, and transformers then lowercases."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path: str, lowercase: bool = True):
    """The tokenizer saved in a directory (a teacher's, or a prepared dataset's).

    `lowercase` applies only where the directory does not say (a bare vocab.txt:
    `says_how_to_normalise`); otherwise the tokenizer normalises as it was saved."""
    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory {path!r} does not exist")
    try:
        kwargs = {} if says_how_to_normalise(path) else {"do_lower_case": lowercase}
        tok = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"no tokenizer can be loaded from {path!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); it needs tokenizer.json or vocab.txt") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"the tokenizer in {path!r} is not a fast (Rust) tokenizer; save it with "
                        "tokenizer.json")
    missing = [n for n in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id", "unk_token_id")
               if getattr(tok, n) is None]
    if missing:
        raise DataError(f"the tokenizer in {path!r} lacks {', '.join(missing)}: a masked-LM "
                        "tokenizer needs [CLS], [SEP], [PAD], [MASK] and [UNK] tokens")
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True):
    """A BERT-style WordPiece tokenizer trained on `texts` (specials get ids 0..4)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True,
                                                handle_chinese_chars=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", do_lower_case=lowercase,
        model_max_length=1_000_000)


def tokenizer_hash(tok) -> str:
    """Changes when the vocabulary, the normalisation or the specials change."""
    state = json.loads(tok.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def special_ids(tok):
    return tuple(sorted(set(tok.all_special_ids)))


def lowercases(tok) -> bool:
    """Whether the tokenizer lowercases its input (its normaliser says so)."""
    state = json.loads(tok.backend_tokenizer.to_str()).get("normalizer") or {}
    parts = state.get("normalizers", [state])
    return any(p.get("lowercase") or p.get("type") == "Lowercase" for p in parts if p)


def unknown_fraction(tok, documents) -> float:
    """The fraction of the word pieces of `documents` that are [UNK]."""
    encoded = tok.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False)
    total = sum(len(e.ids) for e in encoded)
    unknown = sum(e.ids.count(tok.unk_token_id) for e in encoded)
    return unknown / max(total, 1)
