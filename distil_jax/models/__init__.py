"""Flax teacher (BERT/RoBERTa) and student (DistilBERT) masked language models, and task heads."""

from distil_jax.models.bert import Bert, BertConfig
from distil_jax.models.distilbert import DistilBert, DistilBertConfig
from distil_jax.models.heads import QuestionAnswerer, SequenceClassifier
from distil_jax.models.layers import (EncoderConfig, MaskedLM, MaskedLMOutput, apply_recording,
                                      init_params, logical_axes)

__all__ = ["Bert", "BertConfig", "DistilBert", "DistilBertConfig", "EncoderConfig",
           "MaskedLM", "MaskedLMOutput", "QuestionAnswerer", "SequenceClassifier", "apply_recording",
           "init_params", "logical_axes"]
