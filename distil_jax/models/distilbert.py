"""The student: DistilBERT with its masked-LM head, like HF DistilBertForMaskedLM.

No token-type embeddings, no pooler; HF's vocab_transform / vocab_layer_norm /
vocab_projector are our `mlm_head` (transform, layer_norm, tied decoder + bias).
"""

from __future__ import annotations

import dataclasses

from distil_jax.models.layers import EncoderConfig, MaskedLM


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(EncoderConfig):
    """HF DistilBertConfig in BERT's field names (dim -> hidden_size, n_layers -> num_layers,
    hidden_dim -> intermediate_size, dropout -> hidden_dropout, activation -> hidden_act).
    HF DistilBERT fixes layer_norm_eps at 1e-12."""

    num_layers: int = 6


class DistilBert(MaskedLM):
    """DistilBERT masked LM. Unlike BERT, no dropout on the attention output."""

    config: DistilBertConfig
    dropout_after_attention = False
