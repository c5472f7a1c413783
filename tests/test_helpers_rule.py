"""The test suite's own layout (tests/helpers.py): shared helpers live in helper modules, never
in a test module or conftest, and output file names come from ``item_embeddings.outputs``."""

import ast
from pathlib import Path

from item_embeddings import outputs

TESTS = Path(__file__).resolve().parent
# Output file names: a test names them through the constants, so a renamed file is renamed once.
FILE_NAMES = {value: name for name, value in vars(outputs).items()
              if name.isupper() and isinstance(value, str)}


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from ... import`` names, functions' own imports included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.glob("*.py"))


def test_no_test_module_imports_another_test_module_or_conftest():
    local = {p.stem for p in _python_files()}
    offending = [f"{path.name}:{line}: imports {module}"
                 for path in _python_files()
                 for line, module in _imported_modules(ast.parse(path.read_text()))
                 if module.split(".")[0] in local
                 and (module.startswith("test_") or module.split(".")[0] == "conftest")]
    assert not offending, ("shared helpers belong in tests/helpers.py (fixtures in conftest.py, "
                           "used by name):\n" + "\n".join(offending))


def test_helper_modules_exist_and_the_rule_sees_function_level_imports():
    # The check above reads imports inside functions too (a lazy import cannot hide one).
    tree = ast.parse("def f():\n    from test_verify import make_output_set\n")
    assert _imported_modules(tree) == [(2, "test_verify")]
    assert (TESTS / "helpers.py").is_file()


def test_output_file_names_come_from_the_outputs_constants():
    offending = []
    for path in _python_files():
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        offending += [f"{path.name}:{node.lineno}: {node.value!r} (use outputs."
                      f"{FILE_NAMES[node.value]})"
                      for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and node.value in FILE_NAMES
                      and isinstance(node.value, str) and id(node) not in docstrings]
    assert not offending, "\n".join(offending)
