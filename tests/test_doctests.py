"""The examples in the package's docstrings run and show what they say (doctest).

Every module of the installed package whose source holds a ``>>>`` example is found and run,
so a new example is tested without being listed here.
"""

import doctest
import importlib
import importlib.util
from pathlib import Path

import pytest

import item_embeddings

PACKAGE_DIR = Path(item_embeddings.__file__).resolve().parent
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    names = []
    roots = [(PACKAGE_DIR, "item_embeddings")]
    # components/ and pipeline/ install as subpackages from their own folders (package-dir).
    for sub in ("components", "pipeline"):
        module = importlib.util.find_spec(f"item_embeddings.{sub}")
        roots.append((Path(module.origin).parent, f"item_embeddings.{sub}"))
    for folder, package in roots:
        for path in sorted(folder.rglob("*.py")):
            if ">>>" not in path.read_text():
                continue
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return sorted(set(names))


MODULES = _modules_with_examples()


def test_the_package_has_examples():
    # Guards the discovery above: a broken walk would make every run below vanish.
    assert {"item_embeddings.storage", "item_embeddings.fanout", "item_embeddings.items",
            "item_embeddings.estimate"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=OPTIONS)
    tests = [t for t in finder.find(module) if t.examples]
    assert tests, f"{name} has '>>>' in its source but no example doctest can find"
    failures = []
    for test in tests:
        out = []
        result = runner.run(test, out=out.append)
        if result.failed:
            failures.append("".join(out))
    assert not failures, "\n".join(failures)
