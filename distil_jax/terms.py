"""What the objective is made of, as the config names it: the weight of each term
(`LossWeights`, the paper's alphas), the layer-pair terms (`LayerTerm`, resolved from
`distill.layer_terms` by `layer_terms`) and what each kind of them reads (`LAYER_KINDS`).
Declarations only: config validation and checkpoints read them without importing the
losses (objective.py computes them)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Protocol, Sequence, Tuple

class TrainingObjective(Protocol):
    """What the update (step.py), the trainer and the FLOP count (metrics.py) ask of an
    objective: objective.Objective (masked LM distillation, pretraining) and
    task.TaskObjective (fine-tuning a head) are the two."""

    @property
    def uses_teacher(self) -> bool:
        """Whether a term with a positive weight reads the teacher (else it never runs)."""

    @property
    def logit_fraction(self) -> float:
        """The fraction of positions projected onto the vocabulary (model FLOPs)."""

    def prepare(self, rng, batch) -> Tuple[Any, Any, Dict[str, Any]]:
        """(inputs, dropout key, counts) of one whole micro-batch in the global view: any
        draw that must see all its rows (dynamic masking) happens here, before the rows
        are spread over the devices; counts are psummed per micro-batch (metrics)."""

    def grads(self, inputs, rng, params, teacher_params, *, model, teacher) -> Tuple[Dict[str, Any], Any]:
        """(metrics, gradients) of the prepared micro-batch's rows on this device group:
        its share of each mean over the whole micro-batch (parallel.batch_sum)."""


PROJECTIONS = "projections"  # params[PROJECTIONS]: the hidden-state terms' projections


def model_params(params):
    """The student's own params of a trained tree (what is exported), without projections."""
    return {k: v for k, v in params.items() if k != PROJECTIONS}



@dataclasses.dataclass(frozen=True)
class LayerTerm:
    """One layer-pair term: `kind` (a key of LAYER_KINDS) between two layers, weighted."""

    kind: str
    teacher_layer: int
    student_layer: int
    weight: float = 1.0

    @property
    def name(self) -> str:
        """The key of its projection and, as loss_<name>, of its metric."""
        return f"{self.kind}_{self.teacher_layer}_{self.student_layer}"


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weight of each term (the paper's alphas, and the layer-pair terms); 0 leaves a
    term out of the gradient."""

    ce: float = 0.0  # KL(teacher_T || student_T) x T^2 over the vocabulary
    mlm: float = 0.0  # cross-entropy at the MLM targets
    cos: float = 0.0  # 1 - cos(student, teacher) of the last hidden states
    mse: float = 0.0  # squared error of the logits
    layers: Tuple[LayerTerm, ...] = ()

    SCALARS = ("ce", "mlm", "cos", "mse")  # class constants: the config's alpha_<name>
    TEACHER_TERMS = ("ce", "cos", "mse")  # the scalar terms that read the teacher

    @classmethod
    def from_config(cls, config, teacher_layers: int = 0, student_layers: int = 0) -> "LossWeights":
        if config.mode == "pretrain":
            return cls(mlm=1.0)
        d = config.distill
        layers = layer_terms(d.layer_terms, teacher_layers, student_layers) if d.layer_terms else ()
        return cls(ce=d.alpha_ce, mlm=d.alpha_mlm, cos=d.alpha_cos, mse=d.alpha_mse, layers=layers)

    @property
    def uses_teacher(self) -> bool:
        """Whether any term with a positive weight reads the teacher."""
        return any(getattr(self, name) for name in self.TEACHER_TERMS) or any(t.weight for t in self.layers)

    @property
    def records_layers(self) -> bool:
        """Whether a term reads what the layers record (queries, keys, values)."""
        return any(LAYER_KINDS[t.kind].reads_records for t in self.layers)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """A kind of layer-pair term: what it reads (its loss: objective.LAYER_LOSSES)."""

    hidden: bool  # compares hidden states (layer 0 = embeddings allowed; projected across widths)
    reads_records: bool  # reads the layers' queries, keys, values
    needs_equal_heads: bool = False


LAYER_KINDS: Dict[str, LayerKind] = {
    "hidden_mse": LayerKind(hidden=True, reads_records=False),  # TinyBERT
    "hidden_cos": LayerKind(hidden=True, reads_records=False),
    "attention_kl": LayerKind(hidden=False, reads_records=True, needs_equal_heads=True),  # MiniLM, per head
    "relation": LayerKind(hidden=False, reads_records=True),  # MiniLMv2: Q-Q, K-K, V-V
}


def default_teacher_layer(kind: str, teacher_layers: int) -> int:
    """The teacher layer of a term given without layers: the last; for the attention kinds
    of a teacher deeper than 12 layers an upper-middle one, 7/8 of the depth (21 of 24),
    which MiniLMv2 found better than the last for large teachers."""
    if LAYER_KINDS[kind].hidden or teacher_layers <= 12:
        return teacher_layers
    return int(round(teacher_layers * 7 / 8))


def layer_terms(entries: Sequence, teacher_layers: int, student_layers: int) -> Tuple[LayerTerm, ...]:
    """`distill.layer_terms` resolved: each entry (kind,), (kind, teacher layer, student
    layer) or (kind, teacher layer, student layer, weight); a negative layer counts from
    the end (-1: the last); without layers, `default_teacher_layer` onto the student's
    last. ValueError names every bad entry."""
    terms, problems = [], []
    for entry in entries:
        entry = tuple(entry)
        if not entry or entry[0] not in LAYER_KINDS or len(entry) not in (1, 3, 4):
            problems.append(f"{entry!r}: want (kind,), (kind, teacher_layer, student_layer) or "
                            f"(kind, teacher_layer, student_layer, weight), kind one of {tuple(LAYER_KINDS)}")
            continue
        kind = entry[0]
        t, s = (entry[1], entry[2]) if len(entry) >= 3 else (default_teacher_layer(kind, teacher_layers),
                                                             student_layers)
        weight = float(entry[3]) if len(entry) == 4 else 1.0
        lowest = 0 if LAYER_KINDS[kind].hidden else 1
        resolved = []
        for layer, count, who in ((t, teacher_layers, "teacher"), (s, student_layers, "student")):
            layer = int(layer) + count + 1 if int(layer) < 0 else int(layer)
            if not lowest <= layer <= count:
                problems.append(f"{entry!r}: {who} layer {layer} is not in {lowest}..{count}"
                                + (" (0 is the embeddings)" if lowest == 0 else " (encoder layers are 1-based)"))
            resolved.append(layer)
        if weight < 0:
            problems.append(f"{entry!r}: the weight must be >= 0")
        terms.append(LayerTerm(kind, resolved[0], resolved[1], weight))
    names = [term.name for term in terms]
    problems += [f"{n} is given twice" for n in sorted(set(names)) if names.count(n) > 1]
    if problems:
        raise ValueError("distill.layer_terms: " + "; ".join(problems))
    return tuple(terms)
