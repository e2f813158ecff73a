"""Errors for unreadable checkpoint files, and the converters' command-line error handling.

A checkpoint that is missing a file, or whose file was cut short by an interrupted copy or a full disk, must
fail with a message that names the file (and the tensor where one is concerned) and says what to do, not with
a deserializer traceback from deep inside safetensors or ``torch.distributed.checkpoint``. Every such error is a
:class:`CheckpointFormatError`; the subclasses also derive from the built-in exception a caller would have
caught before they existed (``FileNotFoundError`` for a missing file, ``ValueError`` for unreadable contents),
so existing ``except OSError`` / ``except ValueError`` handlers (the config validator's) keep working.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

__all__ = [
    "CheckpointFormatError",
    "MissingCheckpointFileError",
    "CorruptCheckpointFileError",
    "TruncatedCheckpointFileError",
    "run_cli",
]


class CheckpointFormatError(RuntimeError):
    """A checkpoint file (HF or Megatron) is missing or unreadable. ``path``: the file; ``tensor``: if known."""

    def __init__(self, message: str, *, path: Optional[str] = None, tensor: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor

    def __str__(self) -> str:  # OSError / KeyError bases of the subclasses would otherwise format the args
        return str(self.args[0]) if self.args else ""


class MissingCheckpointFileError(CheckpointFormatError, FileNotFoundError):
    """A file the checkpoint needs does not exist (``config.json``, a shard, ``.metadata``, ``offgrpo_model.json``)."""


class CorruptCheckpointFileError(CheckpointFormatError, ValueError):
    """A checkpoint file exists but cannot be parsed (invalid JSON, a damaged header, inconsistent fields)."""


class TruncatedCheckpointFileError(CorruptCheckpointFileError):
    """A checkpoint file is shorter than its own header / metadata says (an interrupted write or copy)."""


def _user_errors() -> tuple:
    """The exceptions a converter CLI reports as ``error: ...`` (bad input, not a bug in the converter)."""
    from megatron_offgrpo.models.architecture import UnsupportedArchitectureError
    from megatron_offgrpo.models.conversion import MissingTensorError, ShapeMismatchError

    return (CheckpointFormatError, UnsupportedArchitectureError, ShapeMismatchError, MissingTensorError,
            FileExistsError)  # fmt: skip


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a converter CLI's ``main``; a user error becomes one ``error: ...`` line on stderr and exit code 2.

    Only the errors of :func:`_user_errors` are caught: each already names the file / tensor and the fix, so a
    traceback would only bury the message. Anything else is a bug and keeps its traceback.
    """
    try:
        return main(argv)
    except _user_errors() as e:
        message = " ".join(str(e).split())  # one line, whatever the message's own formatting
        print(f"error: {message}", file=sys.stderr)
        return 2
