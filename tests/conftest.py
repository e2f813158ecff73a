"""Shared pytest setup: make the test helpers (``loss_reference``, ``mcore_models``) importable."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
