"""Preemption signals: a stop flag that every launcher can set, and saves that the signal cannot break.

How the launchers deliver a stop (each is tested in tests/test_signals.py):

* ``torchrun`` starts every rank in a session of its own and, on SIGTERM / SIGINT, forwards the signal with
  ``killpg`` to each rank's whole process group -- the rank *and the helper processes it started*. Megatron's
  ``dist_checkpointing`` writer uses such helpers (forked writers, and a ``spawn``-ed multiprocessing manager whose
  default SIGTERM action is to die), so a rank saving on SIGTERM lost its helpers mid-save (``BrokenPipeError``,
  an orphan ``iter_N.tmp``). torchrun SIGKILLs the ranks 30 s after forwarding the signal.
* SIGUSR1 (what SLURM's ``--signal=B:USR1@T`` sends) kills ``torchrun`` itself, which does not forward it; its
  ranks would go on orphaned. Each rank therefore asks the kernel for SIGUSR1 when its parent dies
  (``PR_SET_PDEATHSIG``, Linux), which turns "the launcher is gone" into an orderly save-and-exit.
* ``srun`` forwards the signal to each task (the ranks) only.

:class:`StopFlag` records SIGTERM / SIGUSR1 (the training loop agrees on it across ranks once per step);
:func:`signals_deferred` blocks both signals in the calling thread around a save. A signal arriving meanwhile
stays pending and is handled right after (nothing is lost), and every process started during the save inherits
the blocked mask across ``fork`` and ``exec``, so a group-wide signal cannot kill the writer's helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Iterator, Optional

__all__ = ["STOP_SIGNALS", "StopFlag", "signals_deferred", "exit_when_parent_dies"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


class StopFlag:
    """Set by SIGTERM / SIGUSR1; read by the loop, which agrees on it over all ranks before acting."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Back to the default actions (``checkpoint.save_on_signal: false``): a signal ends the process."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signal is None:
            print(f"rank {os.environ.get('RANK', '0')}: received {signal.Signals(signum).name}; saving and "
                  "stopping after the current step", file=sys.stderr, flush=True)
        self.signal = signum


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGTERM / SIGUSR1 in this thread (and in every process started meanwhile) for the duration."""
    # multiprocessing starts its resource tracker on the first spawn and, when it does, *unblocks* SIGINT and
    # SIGTERM in the calling thread afterwards; the writer's spawned manager would then be started unprotected.
    # Started here first (a no-op when it runs already), it leaves our mask alone.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_when_parent_dies(sig: int = signal.SIGUSR1) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (the launcher) dies. Linux only.

    Returns whether it was set. Only meaningful under a launcher that stays alive for the whole run
    (torchrun's agent); the caller decides when that is the case.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True
