"""Task heads in Hugging Face layout: a fine-tuned model as transformers' task classes.

Sequence classification: our `models.SequenceClassifier` (the encoder under `encoder/`,
`pre_classifier`, `classifier`) as BertForSequenceClassification (pooler + classifier),
RobertaForSequenceClassification (classifier.dense + classifier.out_proj) or
DistilBertForSequenceClassification (pre_classifier + classifier), with `id2label`, so
that pipeline("text-classification") loads it. Extractive question answering: our
`models.QuestionAnswerer` (`encoder/`, `qa_outputs`: start and end logits per token) as
*ForQuestionAnswering, for AutoModelForQuestionAnswering (transformers 5 has no
question-answering pipeline). The encoder's rows are
`hf.param_table`'s.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.interop import hf
from distil_jax.models import EncoderConfig, QuestionAnswerer, SequenceClassifier, module_for

Params = Dict[str, Any]
# Sequence-classification heads: the Hugging Face names of our `pre_classifier` (BERT's
# pooler, RoBERTa's classifier.dense) and `classifier` (RoBERTa's classifier.out_proj).
_CLASSIFIER_HEADS = {
    "bert": ("bert.pooler.dense", "classifier"),
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "xlm-roberta": ("classifier.dense", "classifier.out_proj"),
    "distilbert": ("pre_classifier", "classifier"),
}


def _encoder_rows(config: EncoderConfig) -> List[Tuple[str, str, Optional[str]]]:
    """The encoder's rows under `encoder/` (no MLM head, no pooler)."""
    if hf.model_type(config) not in _CLASSIFIER_HEADS:
        raise ValueError(f"task heads are mapped to Hugging Face for {', '.join(_CLASSIFIER_HEADS)} encoders, "
                         f"not {hf.model_type(config)}: fine-tune and export a student of one of those")
    return [(name, f"encoder/{ours}", kind) for name, ours, kind in hf.param_table(config)
            if not ours.startswith(("mlm_head/", "pooler/"))]


def _dense(hf_name: str, ours: str):
    return [(f"{hf_name}.weight", f"{ours}/kernel", "linear"), (f"{hf_name}.bias", f"{ours}/bias", None)]


def question_answering_table(config: EncoderConfig) -> List[Tuple[str, str, Optional[str]]]:
    """Every (HF name, our path, transform) of a question answerer on this encoder."""
    return _encoder_rows(config) + _dense("qa_outputs", "qa_outputs")


def classifier_table(config: EncoderConfig) -> List[Tuple[str, str, Optional[str]]]:
    """Every (HF name, our path, transform) of a sequence classifier on this encoder: the
    encoder's rows and the head's."""
    rows = _encoder_rows(config)
    pre, out = _CLASSIFIER_HEADS[hf.model_type(config)]
    return rows + _dense(pre, "pre_classifier") + _dense(out, "classifier")


def save_hf_classifier(params: Params, config: EncoderConfig, out_dir: str, labels: List[str],
                       tokenizer=None, dtype=np.float32) -> str:
    """A sequence classifier (params of `models.SequenceClassifier`: `encoder`,
    `pre_classifier`, `classifier`) as the architecture's *ForSequenceClassification, with
    `id2label` from `labels` (one label: regression), for pipeline("text-classification")."""
    problem = "regression" if len(labels) == 1 else "single_label_classification"
    return _save(params, config, out_dir, "ForSequenceClassification", classifier_table(config), tokenizer, dtype,
                 id2label={str(i): name for i, name in enumerate(labels)},
                 label2id={name: i for i, name in enumerate(labels)}, problem_type=problem)


def save_hf_question_answerer(params: Params, config: EncoderConfig, out_dir: str, tokenizer=None,
                              dtype=np.float32) -> str:
    """A question answerer (params of `models.QuestionAnswerer`) as the architecture's
    *ForQuestionAnswering, which AutoModelForQuestionAnswering loads."""
    return _save(params, config, out_dir, "ForQuestionAnswering", question_answering_table(config), tokenizer, dtype)


def _save(params, config, out_dir, suffix, table, tokenizer, dtype, **extra) -> str:
    hf_config = {**hf.config_to_hf(config), **extra}
    hf_config["architectures"] = [hf_config["architectures"][0].replace("ForMaskedLM", suffix)]
    return hf.write_hf_dir(hf_config, hf.state_dict_from_params(params, config, dtype, table), out_dir, tokenizer)


def load_hf_task_model(path: str, dtype=jnp.float32) -> Tuple[Any, Params, List[str]]:
    """(module, params, label names) of a *ForSequenceClassification or *ForQuestionAnswering
    directory or hub name: a fine-tuned teacher as users have them, or what `save_hf_classifier`
    / `save_hf_question_answerer` wrote (question answering: no labels)."""
    model_dir = hf.resolve_model_dir(path)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    architecture = (raw.get("architectures") or ["(none given)"])[0]
    config = hf.config_from_hf(raw)
    encoder = module_for(config)(config, dtype=dtype)
    if architecture.endswith("ForSequenceClassification"):
        id2label = raw.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
        labels = [id2label[str(i)] for i in range(len(id2label))]
        module, table, what = SequenceClassifier(encoder, len(labels)), classifier_table(config), "sequence classifier"
    elif architecture.endswith("ForQuestionAnswering"):
        labels, module = [], QuestionAnswerer(encoder)
        table, what = question_answering_table(config), "question answerer"
    else:
        raise ValueError(f"{model_dir} holds a {architecture}, not a fine-tuned model: pass a "
                         "*ForSequenceClassification or *ForQuestionAnswering directory")
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]))
    params = hf.params_from_table(hf.read_state_dict(model_dir), config, table, shapes, what)
    return module, params, labels
