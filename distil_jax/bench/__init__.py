"""Benchmarks, one command: `python -m distil_jax.bench <train|fit|matmul|compare|infer|
attention|data|deploy>` (cli.py). step.py: the train step; inference.py: forwards and
attention kernels; data.py: preparation and the loader; deploy.py: exported models;
timing.py: timers and the record's common fields; torch_reference.py: the PyTorch step."""
