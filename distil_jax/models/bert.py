"""BERT, RoBERTa and XLM-R with their masked-LM head, like HF BertForMaskedLM / RobertaForMaskedLM."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from distil_jax.models.layers import Embed, EncoderConfig, MaskedLM, kernel_init, zeros_init

MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
ROBERTA_LIKE = ("roberta", "xlm-roberta")  # XLM-R is RoBERTa's architecture with its own vocabulary


@dataclasses.dataclass(frozen=True)
class BertConfig(EncoderConfig):
    """HF BertConfig / RobertaConfig fields.

    model_type "roberta" (and "xlm-roberta") counts positions from pad_token_id + 1 over non-pad tokens
    (HF `create_position_ids_from_input_ids`), so its position table is 2 rows longer.
    """

    type_vocab_size: int = 2
    model_type: str = "bert"
    add_pooler: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"BertConfig.model_type {self.model_type!r} is not one of {MODEL_TYPES}")

    @property
    def head_act(self) -> str:
        """RoBERTa's MLM head applies exact gelu whatever hidden_act says (transformers'
        RobertaLMHead); BERT's applies hidden_act."""
        return "gelu" if self.roberta_like else self.hidden_act

    @property
    def roberta_like(self) -> bool:
        return self.model_type in ROBERTA_LIKE

    @property
    def position_offset(self) -> int:
        """Index of the first real position in the position table."""
        return self.pad_token_id + 1 if self.roberta_like else 0


class Bert(MaskedLM):
    """BERT/RoBERTa masked LM; token types default to segment 0 (no NSP anywhere here)."""

    config: BertConfig

    def setup(self):
        super().setup()
        cfg = self.config
        self.token_type_embeddings = Embed(
            cfg.type_vocab_size, cfg.hidden_size, cfg, (None, "embed"),
            dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.add_pooler:
            self.pooler = nn.Dense(
                cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=kernel_init(cfg, ("embed_in", "embed")), bias_init=zeros_init(("embed",)))

    def position_ids(self, input_ids):
        if not self.config.roberta_like:
            return super().position_ids(input_ids)
        pad = self.config.pad_token_id
        real = (input_ids != pad).astype(jnp.int32)
        return jnp.cumsum(real, axis=-1) * real + pad

    def extra_embeddings(self, input_ids, token_type_ids):
        # word + (position + token type): the sum a student with token type 0 folded into
        # its positions computes, so that student_init reproduces this output bit for bit.
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        return super().extra_embeddings(input_ids, token_type_ids) + self.token_type_embeddings(token_type_ids)

    def pool(self, hidden):
        if not self.config.add_pooler:
            return None
        return jnp.tanh(self.pooler(hidden[:, 0]))
