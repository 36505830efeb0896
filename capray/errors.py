"""What the user must fix, told apart from everything else: the exit codes' one source.

``capray`` exits 2 for a ``ConfigError`` (bad usage, configuration or input: running the same command
again cannot help) and 1 for anything else (transient or unexpected: running it again may). Every
error capray raises for the user to act on is a ``ConfigError`` or a subclass (``StorageError``,
``AnnotationError``, ``EncoderError``, ``CheckpointError``, ``ImageDecodeError``); a plain
``ValueError`` (pyarrow's ``ArrowInvalid`` among them) from deep inside a job is a bug or a surprise,
not the user's input, and exits 1. This module imports nothing, so every other module can use it.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad usage, configuration or input, in one line: the user must change something (exit 2).

    A ``ValueError`` so that callers that catch the broad class keep working (``except ValueError``).
    """


def first_line(exc: BaseException) -> str:
    """An exception told in one line: the first line of its message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
