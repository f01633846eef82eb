"""Corpus -> tokenized, split and filtered shards with token counts.

    python -m distil_jax.main --config=configs/FILE.py --workdir=DIR --config.mode=prepare

writes DIR/data (or `data.dir`): `tokenizer/` (loadable with AutoTokenizer), per split and
source `shard-NNNNN.array_record` (one record per sequence, token ids) with its
`.lengths.npy`, `.counts.npy` and a `.json` written last (a shard without its .json is
unfinished and is redone), then `token_counts.npy` (train split, for MLM smoothing) and
`manifest.json`. The rules are the reference's (lm_seqs_dataset.py): each document is
[CLS] text [SEP]; longer ones are cut into chunks of seq_len - 2 with [CLS]/[SEP]
re-added; sequences of 11 tokens or fewer and those half or more [UNK] are dropped.

A second run with the same inputs does nothing; a directory prepared from other inputs
is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from distil_jax import hf, runtime
from distil_jax.data.sources import SPLITS, make_source
from distil_jax.data.types import DataError
from distil_jax.data.tokenizer import (load_tokenizer, lowercases, says_how_to_normalise, tokenizer_hash,
                                       train_wordpiece, unknown_fraction)

MIN_LENGTH = 12  # the reference keeps sequences longer than 11 tokens
MAX_UNK_FRACTION = 0.5  # ... and drops those half or more unknown
# A given tokenizer that turns more than this share of a sample of the corpus into [UNK]
# does not fit it (English text under the tokenizer of its model: well under 1%).
MAX_SAMPLE_UNK_FRACTION = 0.2
SAMPLE_DOCUMENTS = 200
ENCODE_BATCH = 512  # documents per call to the (multi-threaded) Rust tokenizer
FORMAT_VERSION = 1


def split_and_filter(ids: Sequence[int], seq_len: int, cls_id: int, sep_id: int,
                     unk_id: int) -> Tuple[List[np.ndarray], int, int]:
    """Sequences of one document: ([CLS] chunk [SEP], ...), and how many were too short or unknown."""
    body = np.asarray(ids, np.int64)
    step = seq_len - 2
    kept, short, unknown = [], 0, 0
    for start in range(0, max(len(body), 1), step):
        seq = np.concatenate([[cls_id], body[start: start + step], [sep_id]])
        if len(seq) < MIN_LENGTH:
            short += 1
        elif np.count_nonzero(seq == unk_id) / len(seq) >= MAX_UNK_FRACTION:
            unknown += 1
        else:
            kept.append(seq)
    return kept, short, unknown


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _write_records(path: str, sequences: List[np.ndarray], dtype) -> None:
    def write(tmp):
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for seq in sequences:
            writer.write(seq.astype(dtype).tobytes())
        writer.close()
    _atomic_write(path, write)


def _batches(docs: Iterator[str], size: int) -> Iterator[List[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def sources_of(config) -> Dict[str, dict]:
    specs = {name: dict(spec) for name, spec in config.data.sources.items()}
    if not specs:
        raise DataError("data.sources is empty: name at least one source (embedded, text or tfds)")
    return specs


def resolve_tokenizer(config, out_dir: str, sources, vocab_size: Optional[int] = None):
    """The dataset's tokenizer: `data.tokenizer`, the teacher's, already saved here, or trained
    on the corpus (with `vocab_size` entries, default teacher.model.vocab_size).

    A directory prepared with another tokenizer than the one asked for is refused; a
    trained one is checked against the size asked for (a given one, by `check_tokenizer`,
    before shards are written)."""
    saved = os.path.join(out_dir, "tokenizer")
    asked = config.data.tokenizer
    if not asked and config.teacher.path and config.mode != "pretrain":
        asked = hf.resolve_model_dir(config.teacher.path)
    if asked:
        tok = load_tokenizer(asked, lowercase=config.data.lowercase)
        if os.path.isdir(saved) and tokenizer_hash(load_tokenizer(saved)) != tokenizer_hash(tok):
            raise DataError(
                f"{out_dir} was prepared with another tokenizer (hash {tokenizer_hash(load_tokenizer(saved))}) "
                f"than {asked} (hash {tokenizer_hash(tok)}); its token ids would mean other words. "
                "Nothing was changed; set data.dir to another directory")
        return tok
    if os.path.isdir(saved):
        return load_tokenizer(saved)
    size = vocab_size or config.teacher.model.vocab_size
    seen = {"documents": 0, "words": 0}

    def texts():
        for source in sources.values():
            for doc in source.documents("train"):
                seen["documents"] += 1
                seen["words"] += len(doc.split())
                yield doc
    tok = train_wordpiece(texts(), vocab_size=size, lowercase=config.data.lowercase)
    if len(tok) < size:
        replaced = sum(getattr(s, "replaced_bytes", 0) for s in sources.values())
        where = ", ".join(sorted(sources))
        if seen["documents"] == 0:
            raise DataError(f"the corpus is empty: the training split of data.sources ({where}) has no "
                            "document; check the files (an empty file, or only blank lines) or the source")
        raise DataError(
            f"the corpus is too small to train a vocabulary of {size} tokens: the training split of "
            f"data.sources ({where}) has {seen['documents']} documents and {seen['words']} words, which "
            f"give a WordPiece of {len(tok)} tokens (5 of them special)"
            + (f"; {replaced} undecodable bytes were replaced: is it a text file (UTF-8)?" if replaced else "")
            + f". Give a larger corpus, or a smaller teacher.model.vocab_size (at most {len(tok)})")
    return tok


def check_tokenizer(tok, where: str, sources, vocab_size: Optional[int], from_teacher: bool = True) -> None:
    """A teacher's (or given) tokenizer must fit the teacher and the corpus, before any data
    is prepared: no id beyond the teacher's vocabulary, and not mostly [UNK] on a sample."""
    if vocab_size is not None and len(tok) > vocab_size:
        fix = ("the tokenizer and the weights there are not of one model: give the tokenizer the teacher "
               "was trained with as data.tokenizer=DIR" if from_teacher else
               "use the teacher's own tokenizer (data.tokenizer empty and teacher.path set)")
        raise DataError(f"the tokenizer in {where} has {len(tok)} tokens, more than the teacher's vocabulary "
                        f"of {vocab_size}: its ids from {vocab_size} up have no embedding; {fix}")
    sample = [doc for doc, _ in zip((d for s in sources.values() for d in s.documents("train")),
                                    range(SAMPLE_DOCUMENTS))]
    unknown = unknown_fraction(tok, sample) if sample else 0.0
    cased = sum(1 for t in tok.get_vocab() if any(c.isupper() for c in t))
    mismatched_case = lowercases(tok) and cased > 0.1 * len(tok)
    if unknown <= MAX_SAMPLE_UNK_FRACTION:
        if mismatched_case:
            logging.warning("the tokenizer in %s lowercases its input, but %d of its %d vocabulary entries have "
                            "capital letters: if the teacher was trained on cased text, set data.lowercase=False "
                            "(or write a tokenizer_config.json with do_lower_case false)", where, cased, len(tok))
        return
    if mismatched_case:
        cause = (f"the tokenizer lowercases its input, but {cased} of its {len(tok)} vocabulary entries have "
                 "capital letters (a case-sensitive vocab.txt" +
                 ("" if says_how_to_normalise(where) else " with no tokenizer_config.json to say so") +
                 "). Set data.lowercase=False, or write a tokenizer_config.json with "
                 '{"do_lower_case": false} beside its vocab.txt')
    else:
        cause = ("its vocabulary does not fit the corpus (another language or script?). Use the "
                 "teacher's own tokenizer with a corpus in its language")
    raise DataError(f"the tokenizer in {where} turns {unknown:.0%} of the word pieces of {len(sample)} documents "
                    f"of the corpus into [UNK]: {cause}. Nothing was prepared")


def prepare(config, out_dir: str, teacher_vocab_size: Optional[int] = None,
            progress: bool = True) -> Dict:
    """Prepare `config.data.sources` into `out_dir`; returns the manifest."""
    specs = sources_of(config)
    sources = {name: make_source(spec) for name, spec in specs.items()}
    os.makedirs(out_dir, exist_ok=True)
    tok = resolve_tokenizer(config, out_dir, sources, teacher_vocab_size)
    seq_len = config.data.seq_len
    fingerprint = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION, "tokenizer": tokenizer_hash(tok), "seq_len": seq_len,
        "min_length": MIN_LENGTH, "max_unk": MAX_UNK_FRACTION, "docs_per_shard": config.data.docs_per_shard,
        "sources": {n: s.fingerprint() for n, s in sources.items()}}, sort_keys=True).encode()).hexdigest()[:16]

    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest["fingerprint"] == fingerprint:
            return manifest
        raise DataError(f"{out_dir} holds a dataset prepared from other inputs (fingerprint "
                        f"{manifest['fingerprint']}, these inputs give {fingerprint}: another tokenizer, "
                        "seq_len or corpus). Nothing was changed; set data.dir to another directory")
    given = config.data.tokenizer or (config.teacher.path if config.mode != "pretrain" else "")
    if given:  # before anything is written: the tokenizer must fit the teacher and the corpus
        check_tokenizer(tok, given, sources, teacher_vocab_size, from_teacher=not config.data.tokenizer)
    if not os.path.isdir(os.path.join(out_dir, "tokenizer")):
        tok.save_pretrained(os.path.join(out_dir, "tokenizer"))

    ids = dict(cls=tok.cls_token_id, sep=tok.sep_token_id, unk=tok.unk_token_id)
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max else np.int32
    bar = None
    if progress:
        bar = tqdm(unit="doc", desc="prepare", dynamic_ncols=True, mininterval=1.0)
    start, total_tokens = time.perf_counter(), 0
    shards: Dict[str, Dict[str, List[dict]]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        for name, source in sources.items():
            shard_dir = os.path.join(out_dir, split, name)
            os.makedirs(shard_dir, exist_ok=True)
            infos = []
            for k, docs in enumerate(_batches(source.documents(split), config.data.docs_per_shard)):
                base = os.path.join(shard_dir, f"shard-{k:05d}")
                info = _read_done(base, fingerprint)
                if info is None:
                    info = _prepare_shard(base, docs, tok, seq_len, ids, dtype, fingerprint)
                infos.append(info)
                total_tokens += info["tokens"]
                if bar is not None:
                    bar.update(len(docs))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tokens_per_s=f"{total_tokens / elapsed:.3g}", refresh=False)
            replaced = getattr(source, "replaced_bytes", 0)
            shards[split][name] = {"shards": infos, "replaced_bytes": replaced}
    if bar is not None:
        bar.close()
    return _finish(out_dir, manifest_path, fingerprint, tok, shards, specs, seq_len, dtype)


def _read_done(base: str, fingerprint: str) -> Optional[dict]:
    """A finished shard's stats, or None if it must be (re)done."""
    try:
        with open(base + ".json") as f:
            info = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info.get("fingerprint") != fingerprint or not os.path.exists(base + ".array_record"):
        return None
    return info


def _prepare_shard(base, docs, tok, seq_len, ids, dtype, fingerprint) -> dict:
    sequences, short, unknown = [], 0, 0
    for i in range(0, len(docs), ENCODE_BATCH):
        encoded = tok.backend_tokenizer.encode_batch(docs[i: i + ENCODE_BATCH], add_special_tokens=False)
        for enc in encoded:
            kept, s, u = split_and_filter(enc.ids, seq_len, ids["cls"], ids["sep"], ids["unk"])
            sequences += kept
            short, unknown = short + s, unknown + u
    lengths = np.array([len(s) for s in sequences], np.int32)
    counts = np.bincount(np.concatenate(sequences), minlength=len(tok)) if sequences else np.zeros(len(tok), np.int64)
    _write_records(base + ".array_record", sequences, dtype)
    _atomic_write(base + ".lengths.npy", lambda p: np.save(open(p, "wb"), lengths))
    _atomic_write(base + ".counts.npy", lambda p: np.save(open(p, "wb"), counts.astype(np.int64)))
    info = {"fingerprint": fingerprint, "documents": len(docs), "sequences": int(len(sequences)),
            "tokens": int(lengths.sum()), "dropped_short": short, "dropped_unknown": unknown}
    _atomic_write(base + ".json", lambda p: open(p, "w").write(json.dumps(info)))  # done marker, last
    return info


def _finish(out_dir, manifest_path, fingerprint, tok, shards, specs, seq_len, dtype) -> Dict:
    summary: Dict[str, Dict] = {}
    counts = np.zeros(len(tok), np.int64)
    histogram = np.zeros(seq_len // 8 + 1, np.int64)
    for split, by_source in shards.items():
        summary[split] = {}
        for name, entry in by_source.items():
            infos = entry["shards"]
            totals = {k: sum(i[k] for i in infos) for k in
                      ("documents", "sequences", "tokens", "dropped_short", "dropped_unknown")}
            summary[split][name] = {**totals, "shards": len(infos), "replaced_bytes": entry["replaced_bytes"],
                                    "weight": float(specs[name].get("weight", 1.0))}
            if split == "train":
                for k in range(len(infos)):
                    base = os.path.join(out_dir, split, name, f"shard-{k:05d}")
                    counts += np.load(base + ".counts.npy")
                    histogram += np.bincount(np.load(base + ".lengths.npy") // 8, minlength=len(histogram))
    train = summary["train"]
    if sum(s["documents"] for s in train.values()) == 0:
        raise DataError("the corpus is empty: the sources gave no training document; check data.sources")
    if sum(s["sequences"] for s in train.values()) == 0:
        raise DataError("every training document was filtered out (11 tokens or fewer, or half or more "
                        "[UNK]); check the tokenizer matches the language of the corpus")
    np.save(os.path.join(out_dir, "token_counts.npy"), counts)
    manifest = {
        "fingerprint": fingerprint, "format": FORMAT_VERSION, "seq_len": seq_len,
        "dtype": np.dtype(dtype).name, "vocab_size": len(tok), "tokenizer_hash": tokenizer_hash(tok),
        "splits": summary, "length_histogram_bins_of_8": histogram.tolist(),
    }
    _atomic_write(manifest_path, lambda p: open(p, "w").write(json.dumps(manifest, indent=2)))
    return manifest



def prepared_dir(config, workdir: str, process: int = 0) -> str:
    """Where the tokenized corpus lives: data.dir, else WORKDIR/data.

    A workdir on a bucket (gs://...) cannot hold it (preparation and the loader use local
    files): then every process keeps its own copy on its host, under the temp dir and
    named by the workdir, and prepares it itself (`per_process_data`). Set data.dir to a
    directory every host sees (NFS, a gcsfuse mount) to prepare once.
    """
    if config.data.dir:
        return config.data.dir
    if per_process_data(config, workdir):
        key = hashlib.sha256(workdir.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "distil_jax_data", key, f"process_{process}")
    return os.path.join(workdir, "data")


def per_process_data(config, workdir: str) -> bool:
    return not config.data.dir and runtime.is_remote(workdir)


def run(config, workdir: str) -> Dict:
    """Mode prepare (main.py): the sources prepared into `prepared_dir`; the manifest's summary."""
    out_dir = prepared_dir(config, workdir)
    vocab = (hf.read_config(config.teacher.path).vocab_size if config.teacher.path and config.mode != "pretrain"
             else config.teacher.model.vocab_size)
    manifest = prepare(config, out_dir, teacher_vocab_size=vocab)
    return {"dir": out_dir, **{k: manifest[k] for k in ("fingerprint", "vocab_size", "splits")}}
