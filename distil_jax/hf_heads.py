"""Task heads in Hugging Face layout: a fine-tuned model as transformers' task classes.

Sequence classification: our `finetune.SequenceClassifier` (the encoder under `encoder/`,
`pre_classifier`, `classifier`) as BertForSequenceClassification (pooler + classifier),
RobertaForSequenceClassification (classifier.dense + classifier.out_proj) or
DistilBertForSequenceClassification (pre_classifier + classifier), with `id2label`, so
that pipeline("text-classification") loads it. The encoder's rows are `hf.param_table`'s.
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


def classifier_table(config: EncoderConfig) -> List[Tuple[str, str, Optional[str]]]:
    """Every (HF name, our path, transform) of a sequence classifier on this encoder: the
    encoder's rows under `encoder/` (no MLM head, no pooler) and the head's."""
    rows = [(name, f"encoder/{ours}", kind) for name, ours, kind in hf.param_table(config)
            if not ours.startswith(("mlm_head/", "pooler/"))]
    pre, out, _ = _CLASSIFIER_HEADS[hf.model_type(config)]
    for name, ours in ((pre, "pre_classifier"), (out, "classifier")):
        rows += [(f"{name}.weight", f"{ours}/kernel", "linear"), (f"{name}.bias", f"{ours}/bias", None)]
    return rows


def save_hf_classifier(params: Params, config: EncoderConfig, out_dir: str, labels: List[str],
                       tokenizer=None, dtype=np.float32) -> str:
    """A sequence classifier (params of `finetune.SequenceClassifier`: `encoder`,
    `pre_classifier`, `classifier`) as the architecture's *ForSequenceClassification, with
    `id2label` from `labels` (one label: regression), for pipeline("text-classification")."""
    hf_config = hf.config_to_hf(config)
    hf_config["architectures"] = [hf_config["architectures"][0].replace("ForMaskedLM", "ForSequenceClassification")]
    hf_config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    hf_config["label2id"] = {name: i for i, name in enumerate(labels)}
    hf_config["problem_type"] = "regression" if len(labels) == 1 else "single_label_classification"
    state = hf.state_dict_from_params(params, config, dtype, classifier_table(config))
    return hf.write_hf_dir(hf_config, state, out_dir, tokenizer)
