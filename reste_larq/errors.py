"""The project's own errors. The CLIs print these as one line (exit 2); anything else
(TensorFlow's errors included) keeps its traceback.

Both subclass a built-in, so code that catches ValueError / FileNotFoundError keeps
working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad name or value given to the library: says what was given and the choices."""


class DataNotFoundError(FileNotFoundError):
    """No dataset in `data_dir` and TFDS could not provide it; says what to put where."""


class DataFormatError(ValueError):
    """A dataset file exists but is not what its format says: names the file and the fault."""


class RunError(ValueError):
    """A run folder or run configuration that does not allow what was asked (resume a
    finished run, start over an unfinished one, a teacher of another dataset, ...):
    says what is there and what to do instead."""
