"""megatron-offgrpo: offline RL post-training (offline GRPO, SFT, Lightning OPD) on Megatron-Core.

The pipeline is laid out by subpackage: ``data`` / ``rewards`` (teacher rollouts -> trajectory-group dataset),
``losses`` (vocab-parallel log-probs and the policy losses), ``models`` (Megatron-Core model providers),
``training``, ``config``, ``eval``, and ``utils`` (the CPU/gloo backend for Megatron-Core).
"""

__version__ = "0.1.0"
