"""What a practitioner watches: model FLOPs and MFU, a logging window's means, the writers.

TensorBoard's event files are written here (`EventWriter`: TFRecord framing of Event
protos holding scalar summaries, the format TensorBoard reads), not through tensorboardX,
whose import brings in PyTorch (seconds per process start): a run on synthetic data
imports neither torch nor transformers; one that reads a tokenizer still does, through
transformers.

FLOPs follow the MaxText convention: a train step costs 3x the student's forward
(forward + backward) plus 1x the teacher's forward when a loss reads the teacher.
Forward FLOPs per token per layer are 2(4d^2 + 2d*ffn) for the matmuls plus 4*seq*d
for bidirectional attention, and the MLM head adds 2(d^2 + d*V) at each position given
logits (all of them, or only the MLM targets).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Dict, Optional

import jax
from tqdm import tqdm

from distil_jax import storage
from distil_jax.models import EncoderConfig
from distil_jax.train.terms import TrainingObjective

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
def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _float32(v: float) -> bytes:
    """v as a little-endian float32; beyond its range, infinity of v's sign (as protobuf does)."""
    try:
        return struct.pack("<f", v)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, v))


def scalar_event(step: int, values: Dict[str, float], wall_time: Optional[float] = None) -> bytes:
    """An Event proto (wall_time = 1, step = 2, summary = 5) whose Summary holds one
    Value (tag = 1, simple_value = 2) per scalar."""
    summary = b"".join(_field(1, _field(1, k.encode()) + b"\x15" + _float32(v)) for k, v in values.items())
    return (b"\x09" + struct.pack("<d", time.time() if wall_time is None else wall_time) +
            b"\x10" + _varint(step) + _field(5, summary))


class EventWriter:
    """DIR/events.out.tfevents.TIME.HOST.PID, what TensorBoard reads: a version record, then
    one event of scalars per `write`, appended (on a bucket: composed, storage.Appender)."""

    def __init__(self, directory: str):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = storage.Appender(storage.join(directory, name),
                                      tfrecord(b"\x09" + struct.pack("<d", time.time()) + _field(3, b"brain.Event:2")))

    def write(self, step: int, values: Dict[str, float]) -> None:
        self._file.write(tfrecord(scalar_event(step, values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    """metrics.jsonl, TensorBoard event files and a progress bar; silent off process 0."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        path = storage.join(workdir, "metrics.jsonl")
        self._jsonl = storage.Appender(path, _records_up_to(path, initial_step))
        self._tb = EventWriter(storage.join(workdir, "tensorboard"))
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
