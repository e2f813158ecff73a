"""The install step of the README's two commands fails loudly when an install fails (no ``|| true``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from train_helpers import REPO


def test_a_failed_pip_install_fails_setup_env(tmp_path):
    """A project whose dependency cannot be installed (no index reachable): the script exits non-zero and never
    prints "environment ready". The real venv is reused (symlinked), so nothing is downloaded or changed."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "setup_env.sh"), tmp_path / "scripts")
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), tmp_path / ".venv")
    (tmp_path / "constraints.txt").write_text("torch==2.13.0\n")
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='fakeproj', version='0', py_modules=[], extras_require={'dev': []},\n"
        "      install_requires=['megatron-offgrpo-no-such-package==0.0'])\n"
    )
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    out = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "environment ready" not in out.stdout
    assert "the environment is NOT ready" in out.stderr
