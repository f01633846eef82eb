"""Preparation's units as an Apache Beam pipeline (see prepare.py).

One element per (source, unit); `Reshuffle` spreads them over the workers; each worker
unpickles the `UnitWriter` once, builds its sources and tokenizer on its first unit,
and writes its units' shards and done markers itself, so nothing but the small unit
descriptions crosses the runner, and nothing comes back.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from distil_jax.data.shards import UnitWriter
from distil_jax.data.sources import Unit
from distil_jax.data.types import DataError


class PrepareUnit(beam.DoFn):
    def __init__(self, writer: UnitWriter, special: Dict[str, int]):
        super().__init__()
        self._writer, self._special = writer, special

    def setup(self):
        # One worker per core: the tokenizer's own threads would only compete with the
        # other workers (the in-process path keeps them).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def process(self, task):
        name, unit = task
        self._writer(name, unit, self._special)
        return ()


def run(tasks: List[Tuple[str, Unit]], writer: UnitWriter, special: Dict[str, int], options: Sequence[str]) -> None:
    """Run the pipeline to the end; a worker's DataError is raised here with its message."""
    try:
        with beam.Pipeline(options=PipelineOptions(list(options))) as pipeline:
            _ = (pipeline | "units" >> beam.Create(tasks) | "spread" >> beam.Reshuffle()
                 | "prepare" >> beam.ParDo(PrepareUnit(writer, special)))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a worker's DataError comes back wrapped by the runner
        found = re.search(r"DataError: (.+)", str(e))
        if found:
            raise DataError(found.group(1).strip()) from None
        raise
