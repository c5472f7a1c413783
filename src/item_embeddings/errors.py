"""The project's error root: every error the project raises on purpose derives from
:class:`ItemEmbeddingsError`, which carries the exit status the command line ends with.

* :class:`UsageError` (exit status 2): what the user asked for cannot be done as asked — a
  parameter value, a config file, an items table, a model name. It is also a ``ValueError``,
  so code that catches bad values keeps working.
* everything else (exit status 1): an operation that failed — a run, a merge, an API call, a
  damaged input from an earlier step.

A class keeps the built-in base its callers already catch (``ValueError``, ``RuntimeError``,
``OSError``) next to the root, e.g. ``class MergeError(ItemEmbeddingsError, RuntimeError)``.
The command line maps an error by its ``exit_status`` attribute, never by its name
(``ops/cli.py``).
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2


class ItemEmbeddingsError(Exception):
    """An error the project raises on purpose; its message is for the user, not a traceback."""

    exit_status: int = EXIT_FAILED


class UsageError(ItemEmbeddingsError, ValueError):
    """A mistake in what the user asked for (a parameter, a file, a model name): exit status 2."""

    exit_status = EXIT_USAGE


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named (a model config, a checkpoint) does not exist: exit status 2."""
