"""Vocabulary pruning: keep only the token ids a corpus uses (`student.vocab=prune`).

A multilingual teacher holds most of its parameters in its embedding table (XLM-R base:
250,002 x 768 = 192M of its 278M); a corpus in one or a few languages uses a small part
of it. Pruning keeps the ids seen in the prepared corpus (`corpus_seen_ids`, both
splits) plus the tokenizer's special tokens, renumbers them 0..K-1 in ascending order of
old id (`KeptVocab`; [PAD]=0 stays 0, and RoBERTa's <s> <pad> </s> <unk> keep 0..3), and
cuts everything indexed by the vocabulary to those rows:
  - the tokenizer (`prune_tokenizer`: WordPiece, Unigram and BPE models, its added
    tokens and post-processor): on any text whose original ids are all kept it gives
    exactly `kept.remap(original ids)`, special tokens included;
  - the params (`prune_params` at `vocab_paths(model)`: the word embeddings, the MLM
    bias, an untied decoder) and the config (`prune_config`: vocab_size, pad_token_id);
  - the batches (`RemappedBatches`: prepared shards keep their old ids, remapped as
    they are read) and what the masking knows (`prune_vocab_info`).

Why the tokenizer is exact on corpus text. WordPiece is greedy longest match: a kept
piece that was the longest match among all pieces is still the longest among the kept
ones. A Unigram segmentation is the best-scoring path of the piece lattice: removing
pieces removes paths, never the original best one; its unknown-character score is
(minimum piece score - 10), so the minimum is kept where it was (the unknown piece takes
the old minimum score when the kept pieces would raise it) and no path through [UNK]
gains. BPE applies merges in rank order: it gives the same tokens if every merge it
applied survives, i.e. if the kept set is closed under the merges that build its tokens
(`close_under_merges`; `prune_tokenizer` refuses a set that is not).

KL over the kept vocabulary. Teacher and student are both pruned, so the distillation
KL runs over the K kept ids. The pruned teacher's logits are its full logits at the
kept columns (same hidden states: only dropped rows are gone), so its (tempered)
softmax over them is its distribution conditioned on the kept set: the mass it put on
dropped tokens is removed and the rest renormalised, p'(t) = p(t) / sum_{u kept} p(u).
Dropped tokens never occur in the corpus, so no MLM label is lost; the student is
trained to match p', and the random replacement of the 80/10/10 masking draws from the
kept ids only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from etils import epy
from tokenizers import Tokenizer

from distil_jax import storage
from distil_jax.data.shards import FORMAT_VERSION, load_npy, shard_base
from distil_jax.data.sources import SPLITS
from distil_jax.data.types import DataError, VocabInfo

with epy.lazy_imports():  # heavy; the id bookkeeping and the tokenizer need none of them
    import jax
    import transformers
    from flax import traverse_util

    from distil_jax import models as encoders
    from distil_jax.models import students

PRUNED_DIR = "pruned_vocab"  # DATA_DIR/pruned_vocab: kept_vocab.json and the pruned tokenizer
KEPT_FILE = "kept_vocab.json"  # what `KeptVocab.save` writes into a directory
MODEL_TYPES = ("WordPiece", "Unigram", "BPE")  # the tokenizers models `prune_tokenizer` handles
# The tokenizer attributes whose tokens a pruned tokenizer carries over (transformers' names).
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SHOWN = 5  # dropped ids an error message names


@dataclasses.dataclass(frozen=True, eq=False)
class KeptVocab:
    """The old ids kept (int32, strictly ascending); new id i is old id kept[i]."""

    kept: np.ndarray
    old_size: int

    def __post_init__(self):
        kept = np.asarray(self.kept)
        if kept.ndim != 1 or not (np.issubdtype(kept.dtype, np.integer) or kept.size == 0):
            raise ValueError(f"KeptVocab.kept must be a 1-D array of integer ids, got shape {kept.shape} "
                             f"of {kept.dtype}")
        if len(kept) and (kept[0] < 0 or kept[-1] >= self.old_size):
            raise ValueError(f"KeptVocab.kept holds ids outside the old vocabulary 0..{self.old_size - 1}")
        if np.any(np.diff(kept) <= 0):
            raise ValueError("KeptVocab.kept must be strictly ascending (no repeated id); build it with kept_vocab")
        kept = kept.astype(np.int32)
        kept.setflags(write=False)
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "old_size", int(self.old_size))

    def __eq__(self, other) -> bool:
        return (isinstance(other, KeptVocab) and self.old_size == other.old_size
                and np.array_equal(self.kept, other.kept))

    __hash__ = None  # mutable-looking contents: compare, do not hash

    def __repr__(self) -> str:
        return f"KeptVocab(size={self.size}, old_size={self.old_size})"

    @property
    def size(self) -> int:
        """K, the pruned vocabulary's size."""
        return len(self.kept)

    @functools.cached_property
    def old_to_new(self) -> np.ndarray:
        """[old_size] int32: the new id of each old id, -1 where dropped."""
        table = np.full(self.old_size, -1, np.int32)
        table[self.kept] = np.arange(self.size, dtype=np.int32)
        table.setflags(write=False)
        return table

    def dropped_among(self, ids) -> np.ndarray:
        """The distinct ids of `ids` that have no new id (dropped, or outside the old vocabulary)."""
        ids = np.unique(np.asarray(ids, np.int64))
        inside = (ids >= 0) & (ids < self.old_size)
        bad = ~inside
        bad[inside] = self.old_to_new[ids[inside]] < 0
        return ids[bad]

    def remap(self, ids) -> np.ndarray:
        """Old ids (any shape) -> new ids (int32, same shape); a ValueError naming the first
        few ids that were dropped, if any is."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.old_size):
            new = np.full(ids.shape, -1, np.int32)
        else:
            new = self.old_to_new[ids.astype(np.int64, copy=False)]
        if new.size and new.min() < 0:
            dropped = self.dropped_among(ids)
            shown = ", ".join(str(i) for i in dropped[:SHOWN]) + (", ..." if len(dropped) > SHOWN else "")
            raise ValueError(f"{len(dropped)} token id(s) are not in the pruned vocabulary ({shown}; it keeps "
                             f"{self.size} of {self.old_size} ids): the text was not part of the corpus the "
                             "vocabulary was pruned to. Prune to ids seen in this data (corpus_seen_ids of its "
                             "prepared directory), or keep the full vocabulary")
        return new

    def save(self, directory: str) -> str:
        """Writes `KEPT_FILE` into `directory` (local or a bucket); its path."""
        path = storage.join(directory, KEPT_FILE)
        storage.write_text(path, json.dumps({"format": 1, "old_size": self.old_size, "size": self.size,
                                             "kept": self.kept.tolist()}))
        return path

    @classmethod
    def load(cls, directory: str) -> "KeptVocab":
        """What `save` wrote into `directory`."""
        path = storage.join(directory, KEPT_FILE)
        if not storage.exists(path):
            raise DataError(f"{directory} holds no pruned vocabulary ({KEPT_FILE}); build one with kept_vocab_for "
                            "and save it there first")
        state = json.loads(storage.read_bytes(path))
        kept = cls(np.asarray(state["kept"], np.int64), state["old_size"])
        if kept.size != state["size"]:
            raise DataError(f"{path} is damaged: it lists {kept.size} ids but says {state['size']}; build it again")
        return kept


# --- which ids to keep -----------------------------------------------------------------
def _named_ids(special_ids) -> List[Tuple[str, Optional[int]]]:
    if isinstance(special_ids, Mapping):
        return [(str(name), i) for name, i in special_ids.items()]
    return [(f"id {i}", i) for i in special_ids]


def kept_vocab(seen: Union[Iterable[int], Mapping[int, int]], old_size: int,
               special_ids: Union[Iterable[int], Mapping[str, Optional[int]]] = ()) -> KeptVocab:
    """The seen ids and the special ones, sorted: the vocabulary a pruned model keeps.

    `seen`: token ids (any iterable or array; `np.flatnonzero(counts)` of a bincount), or a
    mapping id -> count (ids of count > 0). `special_ids`: ids, or names -> ids (e.g.
    `tokenizer_special_ids(tok)`); a missing (None) one or one outside the vocabulary
    is an error, since the model could never produce it."""
    if isinstance(seen, Mapping):
        seen_ids = np.fromiter((i for i, n in seen.items() if n > 0), np.int64)
    else:
        seen_ids = np.asarray(list(seen) if not isinstance(seen, np.ndarray) else seen, np.int64).ravel()
    problems = []
    for name, i in _named_ids(special_ids):
        if i is None:
            problems.append(f"the special token {name} is missing (no id)")
        elif not 0 <= int(i) < old_size:
            problems.append(f"the special token {name} has id {int(i)}, outside the vocabulary (ids 0..{old_size - 1})")
    if problems:
        raise ValueError("cannot prune the vocabulary: " + "; ".join(problems) + ". The tokenizer does not belong to "
                         f"the model of {old_size} ids: use the model's own tokenizer (data.tokenizer empty), or give "
                         "a tokenizer with all of [CLS], [SEP], [PAD], [MASK] and [UNK] inside the model's vocabulary")
    outside = seen_ids[(seen_ids < 0) | (seen_ids >= old_size)]
    if len(outside):
        raise ValueError(f"the corpus holds token id {int(outside[0])}, outside the model's vocabulary (ids "
                         f"0..{old_size - 1}): it was prepared with another tokenizer than the model's. Prepare it "
                         "with the model's tokenizer into another data.dir")
    specials = np.asarray([int(i) for _, i in _named_ids(special_ids)], np.int64)
    return KeptVocab(np.union1d(seen_ids, specials).astype(np.int64), old_size)


def corpus_token_counts(data_dir: str, splits: Sequence[str] = SPLITS) -> np.ndarray:
    """How often each token id occurs in the sequences of `splits` of a prepared directory
    (the `.counts.npy` every shard carries, summed: nothing but the counts is read).
    Its length is the tokenizer's at preparation time."""
    path = storage.join(data_dir, "manifest.json")
    if not storage.exists(path):
        raise DataError(f"{data_dir} holds no prepared dataset (no manifest.json); run "
                        "`python -m distil_jax.main --config.mode=prepare` with the same config first")
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{data_dir} was prepared by another version of distil_jax (format {manifest.get('format')}, "
                        f"this one reads {FORMAT_VERSION}); prepare the corpus again into a new data.dir")
    counts = np.zeros(int(manifest["vocab_size"]), np.int64)
    for split in splits:
        if split not in manifest["splits"]:
            raise DataError(f"{data_dir} has no split {split!r} (it has {', '.join(manifest['splits'])})")
        for name, info in manifest["splits"][split].items():
            for k in range(info["shards"]):
                counts += load_npy(shard_base(data_dir, split, name, k) + ".counts.npy")
    return counts


def corpus_seen_ids(data_dir: str, splits: Sequence[str] = SPLITS) -> np.ndarray:
    """The ids that occur in `splits` of a prepared directory (ascending). Both splits by
    default: an evaluation batch with a dropped id could not be remapped."""
    return np.flatnonzero(corpus_token_counts(data_dir, splits))


def _state(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(backend, Tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: vocabulary pruning edits the "
                         "tokenizers library's tokenizer.json; load the tokenizer with use_fast=True")
    return json.loads(backend.to_str())


def _processor_ids(processor: Optional[dict]) -> Dict[str, int]:
    """token -> id of every special token a post-processor inserts."""
    if not processor:
        return {}
    kind = processor.get("type")
    if kind == "Sequence":
        return {k: v for p in processor["processors"] for k, v in _processor_ids(p).items()}
    if kind in ("RobertaProcessing", "BertProcessing"):
        return {processor[key][0]: processor[key][1] for key in ("cls", "sep")}
    if kind == "TemplateProcessing":
        return {t: i for special in processor["special_tokens"].values()
                for t, i in zip(special["tokens"], special["ids"])}
    return {}


def tokenizer_special_ids(tokenizer) -> Dict[str, int]:
    """Every id a pruned tokenizer must keep, named: its special tokens (cls, sep, pad,
    mask, unk, bos, eos, the extra ones) and those its post-processor inserts."""
    named = {}
    for attr in SPECIAL_ATTRIBUTES:
        token = tokenizer.special_tokens_map.get(attr)
        if token is not None:
            named[attr.replace("_token", "")] = tokenizer.convert_tokens_to_ids(str(token))
    for token, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        named.setdefault(f"{token!r}", i)
    for token, i in _processor_ids(_state(tokenizer).get("post_processor")).items():
        named.setdefault(f"{token!r} (post-processor)", i)
    return named


def _merges(model: dict) -> List[Tuple[str, str]]:
    """A BPE model's merges as pairs, in rank order (tokenizer.json has "a b" strings or pairs)."""
    pairs = []
    for m in model["merges"]:
        parts = m.split(" ") if isinstance(m, str) else m
        if len(parts) != 2:
            raise ValueError(f"BPE merge {m!r} is not a pair of tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def _merged(model: dict, a: str, b: str) -> str:
    """The token a merge makes (tokenizers strips the continuing-subword prefix of `b`)."""
    prefix = (model.get("continuing_subword_prefix") or "").encode()
    return a + b.encode()[len(prefix):].decode() if prefix else a + b


def close_under_merges(kept: KeptVocab, tokenizer) -> KeptVocab:
    """`kept` with both parts of every merge that makes a kept token, recursively: every
    intermediate token BPE builds on the way to a kept one. Unchanged for a WordPiece or
    Unigram tokenizer (nothing to close)."""
    model = _state(tokenizer)["model"]
    if model["type"] != "BPE":
        return kept
    vocab = model["vocab"]
    made_by: Dict[str, List[Tuple[str, str]]] = {}
    for a, b in _merges(model):
        made_by.setdefault(_merged(model, a, b), []).append((a, b))
    token_of = {i: t for t, i in vocab.items()}
    keep = set(kept.kept.tolist())
    todo = [token_of[i] for i in keep if i in token_of]
    while todo:
        for pair in made_by.get(todo.pop(), ()):
            for part in pair:
                i = vocab[part]
                if i not in keep:
                    if i >= kept.old_size:
                        raise ValueError(f"the BPE token {part!r} (id {i}) builds kept tokens but is outside the "
                                         f"model's vocabulary of {kept.old_size}: the tokenizer does not belong "
                                         "to the model")
                    keep.add(i)
                    todo.append(part)
    return KeptVocab(np.asarray(sorted(keep), np.int64), kept.old_size)


def kept_vocab_for(tokenizer, seen: Union[Iterable[int], Mapping[int, int]], old_size: int,
                   extra_special_ids: Union[Iterable[int], Mapping[str, Optional[int]]] = ()) -> KeptVocab:
    """The vocabulary to keep for `tokenizer` and a model of `old_size` ids: the seen ids,
    the tokenizer's specials and `extra_special_ids` (e.g. the model config's pad id),
    closed under the merges of a BPE tokenizer. What `prune_tokenizer` accepts."""
    specials = {**tokenizer_special_ids(tokenizer), **dict(_named_ids(extra_special_ids))}
    return close_under_merges(kept_vocab(seen, old_size, specials), tokenizer)


# --- the tokenizer ---------------------------------------------------------------------
def _remap_processor(processor: Optional[dict], new_id) -> Optional[dict]:
    if not processor:
        return processor
    kind = processor.get("type")
    if kind == "Sequence":
        return {**processor, "processors": [_remap_processor(p, new_id) for p in processor["processors"]]}
    if kind in ("RobertaProcessing", "BertProcessing"):
        return {**processor, **{key: [processor[key][0], new_id(processor[key][1], processor[key][0])]
                                for key in ("cls", "sep")}}
    if kind == "TemplateProcessing":
        specials = {name: {**s, "ids": [new_id(i, t) for i, t in zip(s["ids"], s["tokens"])]}
                    for name, s in processor["special_tokens"].items()}
        return {**processor, "special_tokens": specials}
    if kind == "ByteLevel":
        return processor
    raise ValueError(f"the tokenizer's post-processor {kind!r} is not one vocabulary pruning knows (Sequence, "
                     "TemplateProcessing, RobertaProcessing, BertProcessing, ByteLevel): it may insert ids that "
                     "would not be remapped")


def prune_tokenizer(tokenizer, kept: KeptVocab):
    """The tokenizer of the kept vocabulary: a `transformers.PreTrainedTokenizerFast` whose
    ids are the new ones, with the original's special tokens and settings.

    On a text whose original ids are all kept it gives `kept.remap(original ids)`,
    special tokens included (see the module docstring). Ids of `kept` beyond the
    tokenizer (a model vocabulary padded past it) have no token, as before."""
    state = _state(tokenizer)
    model = state["model"]
    kind = model["type"]
    if kind not in MODEL_TYPES:
        raise ValueError(f"vocabulary pruning handles the tokenizers models {', '.join(MODEL_TYPES)}, not {kind!r}")
    old_to_new = kept.old_to_new

    def new_id(old: int, token: str = "") -> int:
        new = old_to_new[old] if 0 <= old < kept.old_size else -1
        if new < 0:
            raise ValueError(f"the tokenizer's special token {token!r} (id {old}) is not in the kept vocabulary: "
                             "build it with kept_vocab_for(tokenizer, ...), which keeps every special id")
        return int(new)

    for name, i in tokenizer_special_ids(tokenizer).items():
        new_id(i, name)
    if kind == "Unigram":
        pieces = model["vocab"]
        tokens = {old: pieces[old][0] for old in kept.kept.tolist() if old < len(pieces)}
    else:
        tokens = {old: t for t, old in model["vocab"].items() if 0 <= old < kept.old_size and old_to_new[old] >= 0}
    if sorted(old_to_new[old] for old in tokens) != list(range(len(tokens))):
        raise ValueError("the tokenizer's model vocabulary does not hold ids 0..n-1 before its added tokens; "
                         "vocabulary pruning cannot renumber it")
    if kind == "Unigram":
        vocab = [list(pieces[old]) for old in tokens]  # ascending old ids: new id = position
        unk = model.get("unk_id")
        if unk is not None:
            model["unk_id"] = new_id(unk, pieces[unk][0])
            # The unknown-character score is the lowest piece score - 10: keep the lowest
            # where it was, or a character with no piece could now beat the original path.
            lowest = min(score for _, score in pieces)
            if min(score for _, score in vocab) > lowest:
                vocab[model["unk_id"]][1] = lowest
        model["vocab"] = vocab
    else:
        model["vocab"] = {t: int(old_to_new[old]) for old, t in tokens.items()}
        unk_token = model.get("unk_token")
        if unk_token is not None and unk_token not in model["vocab"]:
            raise ValueError(f"the tokenizer's unknown token {unk_token!r} is not in the kept vocabulary: build it "
                             "with kept_vocab_for(tokenizer, ...), which keeps every special id")
    if kind == "BPE":
        merges = []
        for m, (a, b) in zip(model["merges"], _merges(model)):
            if _merged(model, a, b) not in model["vocab"]:
                continue
            missing = [p for p in (a, b) if p not in model["vocab"]]
            if missing:
                raise ValueError(f"the kept vocabulary is not closed under the BPE merges: {_merged(model, a, b)!r} "
                                 f"is made of {a!r} + {b!r}, and {missing[0]!r} is dropped, so BPE could no longer "
                                 "build it. Close it first: close_under_merges(kept, tokenizer) (kept_vocab_for does)")
            merges.append(m)
        model["merges"] = merges

    added = []
    for token in state.get("added_tokens", []):
        old = token["id"]
        if 0 <= old < kept.old_size and old_to_new[old] >= 0:
            added.append({**token, "id": int(old_to_new[old])})
            tokens.setdefault(old, token["content"])
    state["added_tokens"] = added
    state["post_processor"] = _remap_processor(state.get("post_processor"), new_id)
    if state.get("padding"):
        state["padding"] = {**state["padding"], "pad_id": new_id(state["padding"]["pad_id"],
                                                                 state["padding"].get("pad_token", ""))}
    backend = Tokenizer.from_str(json.dumps(state))
    pruned = _wrap(backend, tokenizer)
    expected = {t: int(old_to_new[old]) for old, t in tokens.items()}
    if pruned.get_vocab() != expected:
        wrong = sorted(set(pruned.get_vocab().items()) ^ set(expected.items()))[:SHOWN]
        raise ValueError(f"the pruned tokenizer does not number its tokens as the kept vocabulary does ({wrong}); "
                         "its added tokens are laid out in a way vocabulary pruning does not handle")
    return pruned


def _wrap(backend: Tokenizer, original):
    """`backend` as a PreTrainedTokenizerFast with `original`'s special tokens and settings."""
    specials = dict(original.special_tokens_map)
    extra = specials.pop("additional_special_tokens", None) or getattr(original, "extra_special_tokens", None) or []
    extra = list(extra.values() if isinstance(extra, Mapping) else extra)
    kwargs = {attr: str(specials[attr]) for attr in SPECIAL_ATTRIBUTES if specials.get(attr) is not None}
    if extra:
        kwargs["additional_special_tokens"] = [str(t) for t in extra]
    for key in ("model_max_length", "padding_side", "truncation_side", "model_input_names"):
        kwargs[key] = copy.copy(getattr(original, key))
    for key in ("clean_up_tokenization_spaces", "do_lower_case"):
        if key in original.init_kwargs:
            kwargs[key] = original.init_kwargs[key]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


# --- params, config, batches -----------------------------------------------------------
def vocab_paths(model) -> Dict[str, int]:
    """"a/b/c" -> axis of every param of `model` (a masked LM or a task head on one) that
    is indexed by the vocabulary: those whose logical axes name "vocab" (Embed's word
    embeddings, MLMHead's bias, ModernBERT's untied decoder)."""
    specs = encoders.logical_axes(model)
    flat = traverse_util.flatten_dict(specs, sep="/")  # a PartitionSpec is a tuple: a leaf
    return {path: tuple(spec).index("vocab") for path, spec in flat.items() if "vocab" in tuple(spec)}


def prune_params(params, kept: KeptVocab, paths: Mapping[str, int]):
    """`params` with the leaves at `paths` ("a/b/c" -> axis: `vocab_paths(model)`) cut to the
    kept ids along that axis, in the new order; every other leaf as it is (shared, not
    copied). Host (numpy) or device arrays; the model's config needs
    `prune_config(config, kept)` to match."""
    flat = traverse_util.flatten_dict(params, sep="/")
    problems = []
    for path, axis in paths.items():
        if path not in flat:
            problems.append(f"{path} is not a param")
        elif flat[path].shape[axis] != kept.old_size:
            problems.append(f"{path} has {flat[path].shape[axis]} rows along axis {axis}, not {kept.old_size}")
    if problems:
        raise ValueError("cannot prune these params to the kept vocabulary: " + "; ".join(problems) +
                         ". Give the paths of this model (vocab_paths(model)) and a KeptVocab of its vocab_size")
    index = np.asarray(kept.kept)
    out = dict(flat)
    for path, axis in paths.items():
        out[path] = flat[path][(slice(None),) * axis + (index,)]
    return traverse_util.unflatten_dict(out, sep="/")


def prune_config(config, kept: KeptVocab):
    """A model config for the kept vocabulary: vocab_size K and the pad id renumbered.

    A RoBERTa-style model counts positions from pad_token_id + 1, so its pad id must not
    move (it does not when the ids below it, RoBERTa's <s>, are kept)."""
    if config.vocab_size != kept.old_size:
        raise ValueError(f"the config's vocab_size is {config.vocab_size}, the kept vocabulary was chosen from "
                         f"{kept.old_size} ids: prune the model the KeptVocab was built for")
    new_pad = int(kept.old_to_new[config.pad_token_id]) if 0 <= config.pad_token_id < kept.old_size else -1
    if new_pad < 0:
        raise ValueError(f"the config's pad_token_id {config.pad_token_id} is not in the kept vocabulary: pass it "
                         "to kept_vocab_for as an extra special id")
    if getattr(config, "position_offset", 0) and new_pad != config.pad_token_id:
        raise ValueError(f"pruning moves the pad id from {config.pad_token_id} to {new_pad}, which would shift "
                         f"this {config.model_type} model's position ids (they start at pad_token_id + 1): keep "
                         f"ids 0..{config.pad_token_id} (extra special ids)")
    return config.replace(vocab_size=kept.size, pad_token_id=new_pad)


def prune_vocab_info(info: VocabInfo, kept: KeptVocab, tokenizer=None, tokenizer_dir: str = "") -> VocabInfo:
    """What the masking knows of the vocabulary, in new ids: size, pad, mask, specials and
    the token counts (the pruned tokenizer and where it is saved, when given)."""
    counts = np.asarray(info.token_counts)
    if counts.size:
        counts = np.pad(counts, (0, max(kept.old_size - len(counts), 0)))[kept.kept]
    return VocabInfo(vocab_size=kept.size, pad_id=int(kept.remap(info.pad_id)), mask_id=int(kept.remap(info.mask_id)),
                     special_ids=tuple(sorted(kept.remap(list(info.special_ids)).tolist())), token_counts=counts,
                     tokenizer=info.tokenizer if tokenizer is None else tokenizer,
                     tokenizer_dir=tokenizer_dir or info.tokenizer_dir, kept=kept)


class RemappedBatches:
    """A batch iterator (data/types.py's BatchIterator) whose `input_ids` are in the kept
    vocabulary's ids: prepared shards keep the old ids, remapped as they are read.
    Everything else (state, epoch size) is the wrapped iterator's."""

    def __init__(self, data, kept: KeptVocab, keys: Sequence[str] = ("input_ids",)):
        self._data, self._kept, self._keys = data, kept, tuple(keys)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = next(self._data)
        return {k: self._kept.remap(v) if k in self._keys else v for k, v in batch.items()}

    def get_state(self) -> Dict[str, Any]:
        return self._data.get_state()

    def set_state(self, state: Dict[str, Any]) -> None:
        self._data.set_state(state)

    def __getattr__(self, name: str):  # sequences_per_epoch, batches_per_epoch, next_batch_index
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._data, name)


# --- what pruning saves ----------------------------------------------------------------
def xlmr_base_config():
    """XLM-RoBERTa base's architecture (xlm-roberta-base's config.json) as a BertConfig."""
    return encoders.BertConfig(vocab_size=250002, hidden_size=768, num_layers=12, num_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                               model_type="xlm-roberta", pad_token_id=1, layer_norm_eps=1e-5)


def _model_of_config(config):
    return encoders.module_for(config)(config)


def count_params(model) -> int:
    """How many parameters `model` has, from their shapes alone (nothing allocated)."""
    shapes = jax.eval_shape(lambda: encoders.init_params(model, jax.random.key(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def parameter_counts(teacher_config=None, kept_size: Union[int, KeptVocab] = 0,
                     student_layers: int = 6) -> Dict[str, int]:
    """Parameters of the teacher (default XLM-R base) and of its `student_layers`-layer
    student (models/students.py's, as distillation builds it), before and after pruning to
    `kept_size` ids; counted from the models' shapes (jax.eval_shape)."""
    teacher = xlmr_base_config() if teacher_config is None else teacher_config
    size = kept_size.size if isinstance(kept_size, KeptVocab) else int(kept_size)
    if not 0 < size <= teacher.vocab_size:
        raise ValueError(f"kept_size must be in 1..{teacher.vocab_size} (the teacher's vocabulary), got {size}")
    student = students.student_config_from_teacher(teacher, num_layers=student_layers)
    counts = {"vocab_size": teacher.vocab_size, "kept_size": size,
              "teacher": count_params(_model_of_config(teacher)),
              "teacher_pruned": count_params(_model_of_config(teacher.replace(vocab_size=size))),
              "student": count_params(_model_of_config(student)),
              "student_pruned": count_params(_model_of_config(student.replace(vocab_size=size)))}
    return counts


def pruned_vocabulary(data_dir: str, tokenizer, old_size: int, extra_special_ids=(), write: bool = True):
    """(KeptVocab, pruned tokenizer, its directory) of a prepared corpus (`student.vocab='prune'`):
    the ids seen in both splits, the tokenizer's specials and `extra_special_ids` (the
    model's pad id), closed under BPE merges; saved once in DATA_DIR/pruned_vocab (by the
    process that writes, `write`; kept_vocab.json last). Deterministic: every process
    computes the same; a directory already there must hold the same ids, else the corpus
    changed under it and the run is refused (a fresh data.dir prepares anew)."""
    directory = storage.join(data_dir, PRUNED_DIR)
    kept = kept_vocab_for(tokenizer, corpus_seen_ids(data_dir), old_size, extra_special_ids)
    pruned = prune_tokenizer(tokenizer, kept)
    if storage.exists(storage.join(directory, KEPT_FILE)):
        saved = KeptVocab.load(directory)
        if saved.old_size != kept.old_size or not np.array_equal(saved.kept, kept.kept):
            raise DataError(f"{directory} holds a pruned vocabulary of {saved.size} ids that the corpus in "
                            f"{data_dir} no longer gives ({kept.size} ids now): the prepared data changed under "
                            "it. Nothing was changed; set data.dir to a fresh directory")
    elif write:
        with tempfile.TemporaryDirectory() as tmp:
            pruned.save_pretrained(tmp)
            kept.save(tmp)
            storage.upload_dir(tmp, directory, last=KEPT_FILE)
    written = storage.exists(storage.join(directory, KEPT_FILE))
    return kept, pruned, storage.local_copy(directory) if written else directory
