"""Corpus -> tokenized, split and filtered shards with token counts: a Beam pipeline.

    python -m distil_jax.main --config=configs/FILE.py --workdir=DIR --config.mode=prepare

writes DIR/data (or `data.dir`, local or gs://): `tokenizer/` (loadable with
AutoTokenizer), per split and source the shards of each unit (shards.py), then
`token_counts.npy` (train split, for MLM smoothing) and `manifest.json`, last.

The work is one element per unit (sources.py) through Apache Beam, the engine TFDS
itself prepares Wikipedia with: by default the DirectRunner in multi-process mode with
`data.prepare_workers` processes (0: one per core) on this machine; `data.beam_options`
hands the pipeline to any runner (Dataflow, Flink, Spark: their pipeline options, e.g.
`("--runner=DataflowRunner", "--project=P", "--region=R", "--temp_location=gs://B/tmp",
"--setup_file=./setup.py")`). With one worker (or one unit left) the same per-unit function
runs in this process, without Beam. Each unit's files depend on the unit alone, and the
manifest is assembled here in unit order, so 1 worker and N workers write the same
sequences in the same order and the same manifest.

A second run with the same inputs does nothing; an interrupted one redoes only the units
without their done marker; a directory prepared from other inputs is refused, never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import logging
from etils import epy
from tqdm import tqdm

from distil_jax import storage
from distil_jax.interop import hf
from distil_jax.data.shards import (MAX_UNK_FRACTION, MIN_LENGTH, STATS, UnitWriter, done_path, load_npy, npy_bytes,
                                    shard_base, token_dtype, FORMAT_VERSION)
from distil_jax.data.sources import KINDS, SPLITS, Unit, make_source
from distil_jax.data.tokenizer import (load_tokenizer, lowercases, says_how_to_normalise, tokenizer_hash,
                                       train_wordpiece, unknown_fraction)
from distil_jax.data.types import DataError

with epy.lazy_imports():  # only a pipeline of several workers needs Beam
    from distil_jax.data import beam_pipeline

# A given tokenizer that turns more than this share of a sample of the corpus into [UNK]
# does not fit it (English text under the tokenizer of its model: well under 1%).
MAX_SAMPLE_UNK_FRACTION = 0.2
SAMPLE_DOCUMENTS = 200


def sources_of(config) -> Dict[str, dict]:
    specs = {name: dict(spec) for name, spec in config.data.sources.items()}
    if not specs:
        raise DataError(f"data.sources is empty: name at least one source ({', '.join(KINDS)})")
    return specs


def saved_tokenizer(out_dir: str):
    """The tokenizer a prepared directory was made with, or None (its tokenizer.json is
    written last: a directory without it was not saved whole)."""
    saved = storage.join(out_dir, "tokenizer")
    if not storage.exists(storage.join(saved, "tokenizer.json")):
        return None
    return load_tokenizer(storage.local_copy(saved))


def resolve_tokenizer(config, out_dir: str, sources, vocab_size: Optional[int] = None):
    """The dataset's tokenizer: `data.tokenizer`, the teacher's, already saved here, or trained
    on the corpus (with `vocab_size` entries, default teacher.model.vocab_size).

    A directory prepared with another tokenizer than the one asked for is refused; a
    trained one is checked against the size asked for (a given one, by `check_tokenizer`,
    before shards are written)."""
    saved = saved_tokenizer(out_dir)
    asked = config.data.tokenizer
    if not asked and config.teacher.path and config.mode != "pretrain":
        asked = hf.resolve_model_dir(config.teacher.path)
    if asked:
        tok = load_tokenizer(asked, lowercase=config.data.lowercase)
        if saved is not None and tokenizer_hash(saved) != tokenizer_hash(tok):
            raise DataError(
                f"{out_dir} was prepared with another tokenizer (hash {tokenizer_hash(saved)}) "
                f"than {asked} (hash {tokenizer_hash(tok)}); its token ids would mean other words. "
                "Nothing was changed; set data.dir to another directory")
        return tok
    if saved is not None:
        return saved
    size = vocab_size or config.teacher.model.vocab_size
    seen = {"documents": 0, "words": 0}

    def texts():
        for source in sources.values():
            for doc in source.documents("train"):
                seen["documents"] += 1
                seen["words"] += len(doc.split())
                yield doc
    tok = train_wordpiece(texts(), vocab_size=size, lowercase=config.data.lowercase)
    if len(tok) > size:
        raise DataError(
            f"the WordPiece trained on the corpus has {len(tok)} entries, more than the {size} of the model's "
            f"vocabulary (teacher.model.vocab_size): the corpus has more distinct characters than that "
            f"({seen['documents']} documents). Check that it is text in one language, or set "
            f"teacher.model.vocab_size to at least {len(tok)}")
    if len(tok) < size:
        where = ", ".join(sorted(sources))
        if seen["documents"] == 0:
            raise DataError(f"the corpus is empty: the training split of data.sources ({where}) has no "
                            "document; check the files (an empty file, or only blank lines) or the source")
        raise DataError(
            f"the corpus is too small to train a vocabulary of {size} tokens: the training split of "
            f"data.sources ({where}) has {seen['documents']} documents and {seen['words']} words, which "
            f"give a WordPiece of {len(tok)} tokens (5 of them special)"
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
    """Prepare `config.data.sources` into `out_dir` (local or a bucket); returns the manifest."""
    storage.check_writable(out_dir)
    specs = sources_of(config)
    sources = {name: make_source(spec) for name, spec in specs.items()}
    storage.makedirs(out_dir)
    tok = resolve_tokenizer(config, out_dir, sources, teacher_vocab_size)
    seq_len, rows_per_unit = config.data.seq_len, config.data.docs_per_shard
    limit = min(teacher_vocab_size or len(tok), len(tok))  # ids at or above it have no embedding
    fingerprint = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION, "tokenizer": tokenizer_hash(tok), "seq_len": seq_len,
        "min_length": MIN_LENGTH, "max_unk": MAX_UNK_FRACTION, "docs_per_shard": rows_per_unit,
        "sources": {n: s.fingerprint() for n, s in sources.items()}}, sort_keys=True).encode()).hexdigest()[:16]

    manifest_path = storage.join(out_dir, "manifest.json")
    if storage.exists(manifest_path):
        manifest = json.loads(storage.read_bytes(manifest_path))
        if manifest["fingerprint"] == fingerprint:
            return manifest
        raise DataError(f"{out_dir} holds a dataset prepared from other inputs (fingerprint "
                        f"{manifest['fingerprint']}, these inputs give {fingerprint}: another tokenizer, "
                        "seq_len or corpus). Nothing was changed; set data.dir to another directory")
    given = config.data.tokenizer or (config.teacher.path if config.mode != "pretrain" else "")
    if given:  # before anything is written: the tokenizer must fit the teacher and the corpus
        check_tokenizer(tok, given, sources, teacher_vocab_size, from_teacher=not config.data.tokenizer)
    if saved_tokenizer(out_dir) is None:
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            storage.upload_dir(tmp, storage.join(out_dir, "tokenizer"), last="tokenizer.json")

    tasks = [(name, unit) for name, source in sources.items() for unit in source.units(rows_per_unit)]
    writer = UnitWriter(out_dir, specs, tok.backend_tokenizer.to_str(), seq_len, fingerprint, limit - 1,
                        len(tok))
    special = dict(cls=tok.cls_token_id, sep=tok.sep_token_id, unk=tok.unk_token_id)
    infos = {(name, unit.index): writer.done(name, unit.index) for name, unit in tasks}
    pending = [(name, unit) for name, unit in tasks if infos[name, unit.index] is None]
    run_units(config, writer, pending, special, progress)
    for name, unit in pending:  # written by the workers: read back their markers
        infos[name, unit.index] = writer.done(name, unit.index)
        if infos[name, unit.index] is None:
            raise DataError(f"unit {unit.index} of source {name!r} has no done marker after the pipeline ran "
                            f"({done_path(out_dir, name, unit.index)}); run mode prepare again to finish it")
    return _finish(out_dir, manifest_path, fingerprint, tok, tasks, infos, specs, seq_len)


def run_units(config, writer: UnitWriter, tasks: List[Tuple[str, Unit]], special: Dict[str, int],
              progress: bool = True) -> None:
    """Every task prepared: in this process (one worker, one task), else a Beam pipeline."""
    if not tasks:
        return
    options = list(config.data.beam_options)
    runner = next((o.split("=", 1)[1] for o in options if o.startswith("--runner=")), "DirectRunner")
    if runner not in ("DirectRunner", "direct") and not storage.is_remote(writer.out_dir):
        raise DataError(f"data.beam_options runs the pipeline on {runner}, whose workers cannot write this "
                        f"machine's {writer.out_dir}: set data.dir to a bucket (gs://...) they all reach")
    workers = min(config.data.prepare_workers or os.cpu_count() or 1, len(tasks))
    if not options and workers <= 1:
        bar = tqdm(total=len(tasks), unit="shard", desc="prepare", dynamic_ncols=True, disable=not progress)
        for name, unit in tasks:  # the function every Beam worker runs, in turn
            writer(name, unit, special)
            bar.update(1)
        bar.close()
        return
    options = options or ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                          f"--direct_num_workers={workers}"]
    logging.info("preparing %d shards with Beam: %s", len(tasks), " ".join(options))
    beam_pipeline.run(tasks, writer, special, options)


def _finish(out_dir, manifest_path, fingerprint, tok, tasks, infos, specs, seq_len) -> Dict:
    summary: Dict[str, Dict] = {split: {} for split in SPLITS}
    counts = np.zeros(len(tok), np.int64)
    histogram = np.zeros(seq_len // 8 + 1, np.int64)
    for split in SPLITS:
        for name in specs:
            units = [unit for n, unit in tasks if n == name]
            parts = [infos[name, unit.index][split] for unit in units]
            totals = {k: sum(p[k] for p in parts) for k in STATS}
            summary[split][name] = {
                **totals, "shards": len(units), "max_id": max((p["max_id"] for p in parts), default=0),
                "replaced_bytes": sum(infos[name, unit.index]["replaced_bytes"] for unit in units) if split == "train"
                else 0, "weight": float(specs[name].get("weight", 1.0))}
            if split == "train":
                for unit in units:
                    base = shard_base(out_dir, split, name, unit.index)
                    counts += load_npy(base + ".counts.npy")
                    lengths = load_npy(base + ".lengths.npy")
                    histogram += np.bincount(lengths // 8, minlength=len(histogram))
    train = summary["train"]
    if sum(s["documents"] for s in train.values()) == 0:
        raise DataError("the corpus is empty: the sources gave no training document; check data.sources")
    if sum(s["sequences"] for s in train.values()) == 0:
        raise DataError("every training document was filtered out (11 tokens or fewer, or half or more "
                        "[UNK]); check the tokenizer matches the language of the corpus, or pack sentence "
                        "rows into documents (the source's pack=True)")
    storage.write_bytes(storage.join(out_dir, "token_counts.npy"), npy_bytes(counts))
    manifest = {
        "fingerprint": fingerprint, "format": FORMAT_VERSION, "seq_len": seq_len,
        "dtype": token_dtype(len(tok)).name, "vocab_size": len(tok),
        "tokenizer_hash": tokenizer_hash(tok), "max_id": max(s["max_id"] for d in summary.values() for s in d.values()),
        "splits": summary, "length_histogram_bins_of_8": histogram.tolist(),
    }
    storage.write_text(manifest_path, json.dumps(manifest, indent=2))
    return manifest


def prepared_dir(config, workdir: str) -> str:
    """Where the tokenized corpus lives: data.dir, else WORKDIR/data (local or a bucket:
    every host of a run reads the same one)."""
    return config.data.dir or storage.join(workdir, "data")


def is_prepared(data_dir: str) -> bool:
    return storage.exists(storage.join(data_dir, "manifest.json"))


def run(config, workdir: str) -> Dict:
    """Mode prepare (main.py): the sources prepared into `prepared_dir`; the manifest's summary."""
    out_dir = prepared_dir(config, workdir)
    vocab = (hf.read_config(config.teacher.path).vocab_size if config.teacher.path and config.mode != "pretrain"
             else config.teacher.model.vocab_size)
    manifest = prepare(config, out_dir, teacher_vocab_size=vocab)
    return {"dir": out_dir, **{k: manifest[k] for k in ("fingerprint", "vocab_size", "splits")}}
