"""Task heads in Hugging Face layout: a fine-tuned model as transformers' task classes.

Sequence classification: our `finetune.SequenceClassifier` (the encoder under `encoder/`,
`pre_classifier`, `classifier`) as BertForSequenceClassification (pooler + classifier),
RobertaForSequenceClassification (classifier.dense + classifier.out_proj) or
DistilBertForSequenceClassification (pre_classifier + classifier), with `id2label`, so
that pipeline("text-classification") loads it. Extractive question answering: our
`finetune.QuestionAnswerer` (`encoder/`, `qa_outputs`: start and end logits per token) as
*ForQuestionAnswering, for pipeline("question-answering"). The encoder's rows are
`hf.param_table`'s.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from distil_jax import hf
from distil_jax.models import EncoderConfig

Params = Dict[str, Any]
# Sequence-classification heads, on the first token: our `pre_classifier` (dense, then
# tanh for BERT and RoBERTa, whose pooler / classifier.dense it is; ReLU for DistilBERT)
# and `classifier` (dense to the labels), as each architecture's *ForSequenceClassification has them.
_CLASSIFIER_HEADS = {
    "bert": ("bert.pooler.dense", "classifier", "tanh"),
    "roberta": ("classifier.dense", "classifier.out_proj", "tanh"),
    "distilbert": ("pre_classifier", "classifier", "relu"),
}


def classifier_activation(config: EncoderConfig) -> str:
    """The activation after `pre_classifier` in this architecture's classification head."""
    return _CLASSIFIER_HEADS[hf.model_type(config)][2]


def _encoder_rows(config: EncoderConfig) -> List[Tuple[str, str, Optional[str]]]:
    """The encoder's rows under `encoder/` (no MLM head, no pooler)."""
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
    pre, out, _ = _CLASSIFIER_HEADS[hf.model_type(config)]
    return rows + _dense(pre, "pre_classifier") + _dense(out, "classifier")


def save_hf_classifier(params: Params, config: EncoderConfig, out_dir: str, labels: List[str],
                       tokenizer=None, dtype=np.float32) -> str:
    """A sequence classifier (params of `finetune.SequenceClassifier`: `encoder`,
    `pre_classifier`, `classifier`) as the architecture's *ForSequenceClassification, with
    `id2label` from `labels` (one label: regression), for pipeline("text-classification")."""
    problem = "regression" if len(labels) == 1 else "single_label_classification"
    return _save(params, config, out_dir, "ForSequenceClassification", classifier_table(config), tokenizer, dtype,
                 id2label={str(i): name for i, name in enumerate(labels)},
                 label2id={name: i for i, name in enumerate(labels)}, problem_type=problem)


def save_hf_question_answerer(params: Params, config: EncoderConfig, out_dir: str, tokenizer=None,
                              dtype=np.float32) -> str:
    """A question answerer (params of `finetune.QuestionAnswerer`) as the architecture's
    *ForQuestionAnswering, for pipeline("question-answering")."""
    return _save(params, config, out_dir, "ForQuestionAnswering", question_answering_table(config), tokenizer, dtype)


def _save(params, config, out_dir, suffix, table, tokenizer, dtype, **extra) -> str:
    hf_config = {**hf.config_to_hf(config), **extra}
    hf_config["architectures"] = [hf_config["architectures"][0].replace("ForMaskedLM", suffix)]
    return hf.write_hf_dir(hf_config, hf.state_dict_from_params(params, config, dtype, table), out_dir, tokenizer)
