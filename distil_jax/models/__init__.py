"""Flax masked language models of every family (BERT / RoBERTa / XLM-R, DistilBERT,
DeBERTa-v2/v3, ModernBERT) and the task heads on them."""

from distil_jax.models.bert import Bert, BertConfig
from distil_jax.models.deberta import DebertaV2, DebertaV2Config
from distil_jax.models.distilbert import DistilBert, DistilBertConfig
from distil_jax.models.heads import QuestionAnswerer, SequenceClassifier
from distil_jax.models.layers import (EncoderConfig, MaskedLM, MaskedLMOutput, apply_recording,
                                      init_params, logical_axes)
from distil_jax.models.modernbert import ModernBert, ModernBertConfig

# config class -> the masked LM built from it (the one place that pairs them)
MODULES = {BertConfig: Bert, DistilBertConfig: DistilBert, DebertaV2Config: DebertaV2, ModernBertConfig: ModernBert}


def module_for(config: EncoderConfig) -> type:
    """The masked-LM class of a config."""
    try:
        return MODULES[type(config)]
    except KeyError:
        raise TypeError(f"no masked LM for a {type(config).__name__}; one of "
                        f"{sorted(c.__name__ for c in MODULES)}") from None


__all__ = ["Bert", "BertConfig", "DebertaV2", "DebertaV2Config", "DistilBert", "DistilBertConfig", "EncoderConfig",
           "MODULES", "MaskedLM", "MaskedLMOutput", "ModernBert", "ModernBertConfig", "QuestionAnswerer",
           "SequenceClassifier", "apply_recording", "init_params", "logical_axes", "module_for"]
