"""python -m distil_jax.bench ... (the commands: bench/cli.py)."""

import sys

from distil_jax.bench.cli import main

main(sys.argv[1:])
