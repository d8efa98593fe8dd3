"""The library's shape: no function in src/layercut is longer than 60 lines (from its ``def`` to the end of its
body, docstring included), measured on the syntax tree so the limit cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "layercut"
LIMIT = 60


def function_lengths(source: str, filename: str = "<source>") -> dict[str, int]:
    """``{qualified name: lines from def to the end of its body}`` for every function and method in ``source``,
    nested ones included (``outer.inner``)."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename), "")
    return lengths


def long_functions(folder: Path, limit: int = LIMIT) -> list[str]:
    """``"module.py: name (N lines)"`` for every function in ``folder``'s modules longer than ``limit`` lines."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for name, length in function_lengths(path.read_text(), str(path)).items():
            if length > limit:
                found.append(f"{path.name}: {name} ({length} lines)")
    return found


def test_lengths_count_from_def_to_the_end_of_the_body_nested_and_methods_included():
    source = ("@decorator\n"
              "def outer(a,\n"
              "          b):\n"
              "    def inner():\n"
              "        return 1\n"
              "\n"
              "    return inner\n"
              "\n"
              "class Box:\n"
              "    def method(self):\n"
              "        '''doc'''\n"
              "        return 2\n")
    assert function_lengths(source) == {"outer": 6, "outer.inner": 2, "Box.method": 3}


def test_a_long_function_is_named_with_its_length(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "module.py").write_text(f"def short():\n    return 1\n\n\ndef too_long():\n{body}\n")
    assert long_functions(tmp_path) == [f"module.py: too_long ({LIMIT + 1} lines)"]


def test_no_function_in_the_library_is_longer_than_the_limit():
    assert list(SOURCE.glob("*.py")), f"no modules found under {SOURCE}"
    offending = long_functions(SOURCE)
    if offending:
        pytest.fail(f"functions longer than {LIMIT} lines (split them into named steps): " + "; ".join(offending))
