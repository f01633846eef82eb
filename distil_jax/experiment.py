"""What a config describes, built: mesh, teacher, student, data and their shardings.

`build(config)` validates first (every problem at once, before anything is loaded or
compiled), then loads the teacher once in float32 (the student copies exact weights),
keeps it on the mesh in `teacher.dtype`, and describes the student's parameters by
their logical axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
from absl import logging

from distil_jax import config as config_lib
from distil_jax import hf, parallel
from distil_jax.checkpoint import params_fingerprint
from distil_jax.data import VocabInfo, make_data
from distil_jax.models import (Bert, BertConfig, DistilBert, EncoderConfig, MaskedLM, init_params,
                               logical_axes)
from distil_jax.student_init import init_student_from_teacher, student_config_from_teacher

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Experiment:
    config: Any
    mesh: jax.sharding.Mesh
    model: MaskedLM  # what is trained: the student (distill) or a BERT (pretrain)
    teacher: Optional[MaskedLM]
    teacher_params: Any  # on the mesh, in teacher.dtype; None in pretrain mode
    teacher_ref: Dict[str, str]  # path and fingerprint, recorded in checkpoints
    vocab: VocabInfo
    train_data: Any
    param_shardings: Any
    teacher_shardings: Any
    total_updates: int
    initial_params: Callable[[], Any]  # fresh params on the mesh (student init or random)

    @property
    def model_config(self) -> EncoderConfig:
        return self.model.config

    @property
    def accumulation(self) -> int:
        return self.config.train.batch_size // self.config.train.micro_batch_size

    def meta(self) -> Dict[str, Any]:
        return {"mode": self.config.mode, "teacher": self.teacher_ref,
                "model": {"type": type(self.model).__name__, **dataclasses.asdict(self.model_config)},
                "config": self.config.to_dict()}


def _teacher_ref(path: str, params) -> Dict[str, str]:
    return {"path": path or "(random teacher.model)", "fingerprint": params_fingerprint(params)}


def load_teacher(config):
    """(module in teacher.dtype, float32 params, config) of the teacher."""
    dtype = DTYPES[config.teacher.dtype]
    if config.teacher.path:
        module, params = hf.load_hf_model(config.teacher.path)
    else:
        logging.warning("teacher.path is empty: the teacher is random (teacher.model); "
                        "useful for tests only")
        module = Bert(BertConfig(**config.teacher.model.to_dict()))
        params = jax.jit(lambda key: init_params(module, key))(jax.random.key(config.train.seed + 1))
    return (type(module)(module.config, dtype=dtype, param_dtype=dtype,
                         attention_impl=config.train.attention or None), params, module.config)


def build(config, workdir: str = "", process_index: Optional[int] = None,
          process_count: Optional[int] = None, split: str = "train") -> Experiment:
    process_count = jax.process_count() if process_count is None else process_count
    config_lib.validate(config, num_devices=jax.device_count())
    mesh = parallel.make_mesh(config.mesh.shape)
    if process_index is None:  # the block of every global batch this process's devices hold
        process_index = parallel.batch_block(mesh, config.train.micro_batch_size)
    rules = [tuple(r) for r in config.mesh.rules]
    compute = DTYPES[config.train.dtype]
    # Compute in train.dtype over float32 master params; the attention and remat choices.
    kw = dict(dtype=compute, attention_impl=config.train.attention or None, remat=config.train.remat)

    if config.mode == "pretrain":
        model_config = config_lib.teacher_config_of(config)
        model = Bert(model_config, **kw)
        teacher = teacher_params32 = teacher_sh = None
        teacher_ref = {"path": "", "fingerprint": ""}
        teacher_config = model_config
    else:
        teacher, teacher_params32, teacher_config = load_teacher(config)
        sizes = config_lib.student_sizes(config, teacher_config)
        s_config = student_config_from_teacher(
            teacher_config, num_layers=config.student.num_layers, **sizes)
        model = DistilBert(s_config, **kw)
        teacher_ref = _teacher_ref(config.teacher.path, teacher_params32)

    train_data, vocab = make_data(config, split, config.train.micro_batch_size, process_index,
                                  process_count, vocab_size=model.config.vocab_size, workdir=workdir)
    if vocab.vocab_size != model.config.vocab_size:
        raise config_lib.ConfigError(
            f"the data's vocabulary has {vocab.vocab_size} tokens, the model's {model.config.vocab_size}; "
            "prepare the data with the teacher's tokenizer")

    if teacher is not None:
        teacher_sh = parallel.logical_shardings(
            jax.eval_shape(lambda: teacher_params32), logical_axes(teacher), mesh, rules)
        teacher_params = jax.device_put(
            jax.tree.map(lambda x: x.astype(teacher.dtype), teacher_params32), teacher_sh)
    else:
        teacher_params = None

    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    param_sh = parallel.logical_shardings(abstract, logical_axes(model), mesh, rules)

    def initial_params():
        if config.mode != "pretrain" and config.student.init == "teacher":
            host = init_student_from_teacher(
                teacher_params32, teacher_config, model.config,
                layer_map=tuple(config.student.layer_map) or None,
                vocab_transform=config.student.vocab_transform,
                fold_token_type=config.student.fold_token_type,
                rng=jax.random.key(config.train.seed + 2))
            return jax.device_put(host, param_sh)
        init = jax.jit(lambda rng: init_params(model, rng), out_shardings=param_sh)
        return init(jax.random.key(config.train.seed + 2))

    t = config.train
    total = t.steps if t.steps > 0 else max(1, t.epochs * train_data.sequences_per_epoch // t.batch_size)
    return Experiment(config=config, mesh=mesh, model=model, teacher=teacher,
                      teacher_params=teacher_params, teacher_ref=teacher_ref, vocab=vocab,
                      train_data=train_data, param_shardings=param_sh, teacher_shardings=teacher_sh,
                      total_updates=int(total), initial_params=initial_params)
