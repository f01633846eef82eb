"""Task heads on either encoder, as transformers' task classes compute them.

`SequenceClassifier`: on the first token, dense + tanh (BERT's pooler, RoBERTa's
classifier.dense) or dense + ReLU (DistilBERT's pre_classifier), dropout, dense to the
labels. `QuestionAnswerer`: dropout + dense to 2 on every token: start and end logits.
Params: the encoder's under `encoder`, the head's beside (hf_heads.py maps both to
Hugging Face names); `config` is the encoder's, and so is the heads' dropout rate unless
`dropout` is given.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from distil_jax.models.distilbert import DistilBertConfig
from distil_jax.models.layers import Dropout, MaskedLM


def dropout_rate(head) -> float:
    return head.encoder.config.hidden_dropout if head.dropout is None else head.dropout


class SequenceClassifier(nn.Module):
    """An encoder (Bert or DistilBert) with a head on its first token."""

    encoder: MaskedLM
    num_labels: int
    dropout: Optional[float] = None  # None: the encoder's hidden_dropout

    @property
    def config(self):
        return self.encoder.config

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        out = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                           compute_logits=False)
        h = out.last_hidden_state[:, 0]
        activation = nn.relu if isinstance(self.encoder.config, DistilBertConfig) else jnp.tanh
        h = activation(nn.Dense(h.shape[-1], name="pre_classifier")(h))
        h = Dropout(dropout_rate(self))(h, deterministic=deterministic)
        return nn.Dense(self.num_labels, name="classifier")(h)


class QuestionAnswerer(nn.Module):
    """An encoder with a start and an end logit per token (extractive QA; data/squad.py):
    dropout + dense to 2 on the last hidden states, as transformers' *ForQuestionAnswering."""

    encoder: MaskedLM
    dropout: Optional[float] = None  # None: the encoder's hidden_dropout

    @property
    def config(self):
        return self.encoder.config

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        out = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                           compute_logits=False)
        h = Dropout(dropout_rate(self))(out.last_hidden_state, deterministic=deterministic)
        logits = nn.Dense(2, name="qa_outputs")(h)
        return logits[..., 0], logits[..., 1]
