"""What a practitioner watches: model FLOPs and MFU, and the metric writers.

FLOPs follow the MaxText convention (REFERENCE.md): a step costs 3x the student's
forward (forward + backward) plus 1x the teacher's forward. Forward FLOPs per token
per layer are 2(4d^2 + 2d*ffn) for the matmuls plus 4*seq*d for bidirectional
attention, and the MLM head adds 2(d^2 + d*V) where logits are computed.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import jax

from distil_jax.models import EncoderConfig

# Dense bf16 peak TFLOP/s per device (vendor figures), matched by substring of device_kind.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def forward_flops_per_token(config: EncoderConfig, seq_len: int, head_rows: float = 1.0) -> float:
    """Forward FLOPs per token; `head_rows` is the fraction of positions given logits."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layer = 2 * (4 * d * d + 2 * d * f) + 4 * seq_len * d
    return config.num_layers * layer + head_rows * 2 * (d * d + d * v)


def step_flops_per_token(student: EncoderConfig, teacher: Optional[EncoderConfig], seq_len: int,
                         head_rows: float = 1.0) -> float:
    """Model FLOPs per token of one train step: student fwd + bwd, teacher fwd; `head_rows`
    is the fraction of positions projected onto the vocabulary (1: all rows' KL)."""
    flops = 3 * forward_flops_per_token(student, seq_len, head_rows)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len, head_rows)
    return flops


def device_peak_tflops(override: float = 0.0) -> Optional[float]:
    """Peak TFLOP/s of one local device: `override` if set, else from the table, else None."""
    if override > 0:
        return override
    kind = jax.local_devices()[0].device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def _step_of(line: str) -> Optional[int]:
    """The step of a complete record; None for a blank line or one torn by a kill."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except ValueError:
        return None


def _drop_records_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def is_remote(path: str) -> bool:
    """A URL (gs://bucket/...) rather than a local path."""
    return "://" in path


class _RewrittenFile:
    """metrics.jsonl on object storage: every write replaces the whole object."""

    def __init__(self, path: str, initial_step: int):
        from etils import epath
        self._path = epath.Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        old = self._path.read_text().splitlines() if self._path.exists() else []
        self._lines = [x + "\n" for x in old if x.strip() and json.loads(x)["step"] <= initial_step]

    def write(self, line: str) -> None:
        self._lines.append(line)

    def flush(self) -> None:
        self._path.write_text("".join(self._lines))

    def close(self) -> None:
        self.flush()


class MetricWriter:
    """metrics.jsonl, TensorBoard event files and a progress bar; silent off process 0."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if is_remote(workdir):  # a bucket (gs://) cannot append: the file is rewritten whole
            self._jsonl = _RewrittenFile(path, initial_step)
        else:
            os.makedirs(workdir, exist_ok=True)
            _drop_records_after(path, initial_step)  # a resume repeats what came after its checkpoint
            self._jsonl = open(path, "a")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # event files are optional; metrics.jsonl always exists
            self._tb = None
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         mininterval=1.0)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
        shown = {k: metrics[k] for k in ("loss", "tokens_per_s") if metrics.get(k) is not None}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._bar.close()
