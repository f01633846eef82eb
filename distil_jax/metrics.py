"""What a practitioner watches: model FLOPs and MFU, a logging window's means, the writers.

TensorBoard's event files are written by tensorboardX (`EventWriter`: its Event protos,
scalar summaries, TFRecord framing and CRC), imported only by the process that writes them,
without the PyTorch import its package makes where PyTorch is installed (`_tensorboardx`).

FLOPs follow the MaxText convention: a train step costs 3x the student's forward
(forward + backward) plus 1x the teacher's forward when a loss reads the teacher.
Forward FLOPs per token per layer are 2(4d^2 + 2d*ffn) for the matmuls plus 4*seq*d
for bidirectional attention, and the MLM head adds 2(d^2 + d*V) at each position given
logits (all of them, or only the MLM targets).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Dict, Optional

import jax
from tqdm import tqdm

from distil_jax import storage
from distil_jax.models import EncoderConfig
from distil_jax.terms import TrainingObjective

# Dense bf16 peak TFLOP/s per device (vendor figures), matched by substring of device_kind.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def forward_flops_per_token(config: EncoderConfig, seq_len: int, logit_fraction: float = 1.0) -> float:
    """Forward FLOPs per token; `logit_fraction` is the fraction of positions given logits."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layer = 2 * (4 * d * d + 2 * d * f) + 4 * seq_len * d
    return config.num_layers * layer + logit_fraction * 2 * (d * d + d * v)


def train_flops_per_token(obj: TrainingObjective, student: EncoderConfig, teacher: Optional[EncoderConfig],
                          seq_len: int) -> float:
    """Model FLOPs per token of a train step by `obj` (or a task.TaskObjective): student
    fwd + bwd, and the teacher's forward when a term reads it; the vocabulary head only on
    the rows the objective projects (none for a task)."""
    flops = 3 * forward_flops_per_token(student, seq_len, obj.logit_fraction)
    if teacher is not None and obj.uses_teacher:
        flops += forward_flops_per_token(teacher, seq_len, obj.logit_fraction)
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


# --- a logging window's means ------------------------------------------------------------
_PER_UPDATE = ("grad_norm", "lr")
_COUNTS = ("updates", "skipped_updates", "finite_micro_batches", "real_tokens", "targets", "examples")


def window_summary(sums: Dict[str, float], seconds: float, flops: float, sequences: int,
                   num_devices: int, peak_tflops: Optional[float]) -> Dict[str, float]:
    """Means of a window's summed step metrics, plus throughput (model FLOPs per device).

    Loss terms are means over the finite micro-batches (None if none was), grad_norm and
    lr over the applied updates."""
    micro, updates = sums["finite_micro_batches"], max(sums["updates"], 1.0)
    out = {k: v / micro if micro else None for k, v in sums.items() if k not in _PER_UPDATE + _COUNTS}
    out.update({k: sums[k] / updates for k in _PER_UPDATE})
    out["skipped_updates"] = sums["skipped_updates"]
    updates = max(sums["updates"] + sums["skipped_updates"], 1.0)
    tflops = flops / seconds / 1e12 / num_devices
    out.update(tokens_per_s=sums["real_tokens"] / seconds, sequences_per_s=sequences / seconds,
               step_time_s=seconds / updates, tflops_per_device=tflops,
               mfu=(tflops / peak_tflops) if peak_tflops else None)
    return out


# --- writers --------------------------------------------------------------------------------
def _step_of(line: str) -> Optional[int]:
    """The step of a complete record; None for a blank line or one torn by a kill."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except ValueError:
        return None


def _records_up_to(path: str, step: int) -> bytes:
    """The complete records of `path` up to `step` (a resume repeats what came after its
    checkpoint; a line torn by a kill is dropped)."""
    if not storage.exists(path):
        return b""
    lines = storage.read_text(path).splitlines(keepends=True)
    return "".join(line for line in lines if _step_of(line) is not None and _step_of(line) <= step).encode()


# --- TensorBoard event files --------------------------------------------------------------
def _tensorboardx():
    """tensorboardX's (event_file_writer, record_writer, summary, event_pb2). Its package
    imports PyTorch where PyTorch is installed, for tensor types this writer never passes:
    about a second of CPU and 180 MB of memory in every process that writes metrics (peak
    RSS after the import: 257 MB with torch, 76 MB without). So it is first imported with
    `import torch` failing, which it handles (numpy only); torch imports as usual after."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # an import of torch raises ImportError while this is set
        try:
            importlib.import_module("tensorboardX")
        finally:
            del sys.modules["torch"]
    from tensorboardX import event_file_writer, record_writer, summary
    from tensorboardX.proto import event_pb2
    return event_file_writer, record_writer, summary, event_pb2


class _AppendedFiles:
    """tensorboardX's writer factory for a URL scheme: an event file is a storage.Appender
    (on GCS grown by compose; tensorboardX's own gs:// writer uploads it whole at each flush)."""

    def open(self, path: str) -> storage.Appender:
        return storage.Appender(path)

    def directory_check(self, path: str) -> None:
        pass


class EventWriter:
    """DIR/events.out.tfevents.TIME.HOST.PID, what TensorBoard reads, written by tensorboardX:
    its version record, then one event of scalars per `write`, flushed (on a bucket: appended
    by compose). Steps from `purge_from` on that earlier files hold are dropped by TensorBoard
    (a SessionLog START there, tensorboardX's `purge_step`): a resume repeats them."""

    def __init__(self, directory: str, purge_from: Optional[int] = None):
        event_file_writer, record_writer, summary, event_pb2 = _tensorboardx()
        self._event, self._scalar = event_pb2.Event, summary.scalar  # float32; out of range: +-inf
        if storage.is_remote(directory):
            record_writer.register_writer_factory(directory.split("://")[0], _AppendedFiles())
        else:
            storage.makedirs(directory)
        self._writer = event_file_writer.EventsWriter(storage.join(directory, "events"), f".{os.getpid()}")
        if purge_from is not None:
            self._writer.write_event(event_pb2.Event(
                wall_time=time.time(), step=purge_from,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._writer.flush()

    def write(self, step: int, values: Dict[str, float]) -> None:
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary={
            "value": [v for k, x in values.items() for v in self._scalar(k, x).value]}))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricWriter:
    """metrics.jsonl, TensorBoard event files and a progress bar; silent off process 0."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        path = storage.join(workdir, "metrics.jsonl")
        self._jsonl = storage.Appender(path, _records_up_to(path, initial_step))
        self._tb = EventWriter(storage.join(workdir, "tensorboard"), purge_from=initial_step + 1)
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         mininterval=1.0)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write((json.dumps(record) + "\n").encode())
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write(step, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        shown = {k: metrics[k] for k in ("loss", "tokens_per_s") if metrics.get(k) is not None}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._bar.update(steps)

    def close(self) -> None:
        """Close the files (once; later calls do nothing)."""
        if not self.enabled:
            return
        self.enabled = False
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._bar.close()
