"""Shared pytest setup: the test helpers (``loss_reference``, ``train_helpers``, ...) importable, and the worlds
of rank processes reused across tests (``run_on_ranks`` runs on long-lived pools instead of spawning: every
spawned rank pays seconds for importing torch and Megatron)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def _reused_rank_worlds():
    from megatron_offgrpo.utils.distributed import use_rank_pools

    use_rank_pools(True)
    yield
    use_rank_pools(False)
