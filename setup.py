"""megatron-offgrpo: offline GRPO / SFT / OPD post-training on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_offgrpo",
    version="0.1.0",
    description="Offline RL post-training (offline GRPO, SFT, Lightning OPD) for reasoning LLMs on Megatron-Core",
    packages=find_packages(include=["megatron_offgrpo", "megatron_offgrpo.*"]),
    python_requires=">=3.10",
    # torch itself is deliberately unpinned here: scripts/setup_env.sh installs the CPU wheel (or the
    # cluster image provides the CUDA one) before this package, and constraints.txt keeps it in place.
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "omegaconf>=2.3",
        "tqdm",
        "rich",
        "safetensors",
        # Megatron dist_checkpointing (torch_dist) save workers need it; without it a save deadlocks.
        "psutil",
        "transformers>=4.51",
        "datasets",
        "pyarrow",
        "math-verify[antlr4_13_2]==0.9.0",  # exact: a release can change every reward (tested)
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # GPU-only; imported lazily by the code that uses them.
        "gpu": ["transformer-engine[pytorch]", "vllm"],
        "dev": ["pytest>=8", "pytest-timeout"],
    },
)
