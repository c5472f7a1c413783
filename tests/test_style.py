"""The tree keeps the style pinned in pyproject.toml ([tool.ruff]): line length, import order, and
the pyflakes/bugbear/pyupgrade rules chosen there. Run ``ruff check --fix .`` to mend most of it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_whole_tree_passes_ruff():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
