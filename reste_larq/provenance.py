"""What made a result: the library versions and the source commit, for metrics.json.

A figure in a table can then be traced to the stack and the code that produced it:

```python
from reste_larq import provenance

provenance.describe()
# {'python': '3.11.7', 'tensorflow': '2.19.1', 'tf_keras': '2.19.0', 'larq': '0.14.0',
#  'larq_compute_engine': '0.16.0', 'reste_larq': '0.1.0',
#  'commit': '0279539…', 'commit_dirty': False}
```
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

# distribution names, first found wins (tensorflow-cpu installs the same package)
DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-intel"),
    "tf_keras": ("tf-keras",),
    "larq": ("larq",),
    "larq_compute_engine": ("larq-compute-engine",),
    "tensorflow_datasets": ("tensorflow-datasets",),
    "numpy": ("numpy",),
    "reste_larq": ("reste-larq",),
}


def versions() -> dict[str, str | None]:
    """Installed version of Python and of each library of the stack (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for key, names in DISTRIBUTIONS.items():
        found[key] = None
        for name in names:
            try:
                found[key] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def commit(directory: str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding this package (or `directory`);
    (None, None) for an installed copy outside git or without a git command."""
    directory = directory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*argv):
        return subprocess.run(
            ["git", "-C", directory, *argv], capture_output=True, text=True, timeout=10
        )

    try:
        top = git("rev-parse", "--show-toplevel")
        # only the checkout this package is the source of: an installed copy inside a
        # venv inside some repository must not report that repository's commit
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(directory):
            return None, None
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def describe() -> dict:
    """versions() plus the commit and whether tracked files differ from it."""
    head, dirty = commit()
    return {**versions(), "commit": head, "commit_dirty": dirty}
