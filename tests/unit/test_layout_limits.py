"""No god classes or god functions in the core packages: a class over 400 lines or a function over
80 lines in melo_runtime, daemon or schemas fails here, naming it, so the split stays split.

Lines count from the ``class`` / ``def`` line to the last line of the body (docstrings, comments
and blank lines included: what a reader scrolls through). Nested functions count on their own and
inside their parent.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("melo_runtime", "daemon", "schemas")
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


def oversized(source: str, where: str) -> list[str]:
    """``"<where>:<line> class|def <name>: <n> lines"`` for each class or function over its limit."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.ClassDef):
            kind, limit = "class", MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind, limit = "def", MAX_FUNCTION_LINES
        else:
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > limit:
            found.append(f"{where}:{node.lineno} {kind} {node.name}: {lines} lines (limit {limit})")
    return found


def test_no_class_over_400_lines_and_no_function_over_80_lines_in_the_core_packages():
    files = sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))
    assert len(files) > 50  # the walk found the packages
    found = [item for path in files for item in oversized(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not found, "split these into named modules or helpers:\n" + "\n".join(found)


def _class_source(name: str, class_lines: int, method_lines: int) -> str:
    """A class of exactly ``class_lines`` lines holding one method of exactly ``method_lines`` lines."""
    body = "\n".join(f"        x{i} = {i}" for i in range(method_lines - 1))
    filler = "\n".join(f"    y{i} = {i}" for i in range(class_lines - 1 - method_lines))
    return f"class {name}:\n    def method(self):\n{body}\n{filler}\n"


def test_the_check_names_a_class_and_a_method_one_line_over_their_limits_and_passes_them_at_the_limit():
    at_limit = _class_source("Fits", MAX_CLASS_LINES, MAX_FUNCTION_LINES)
    over = _class_source("Big", MAX_CLASS_LINES + 1, MAX_FUNCTION_LINES + 1)
    assert oversized(at_limit, "fits.py") == []
    assert oversized(over, "big.py") == [
        f"big.py:1 class Big: {MAX_CLASS_LINES + 1} lines (limit {MAX_CLASS_LINES})",
        f"big.py:2 def method: {MAX_FUNCTION_LINES + 1} lines (limit {MAX_FUNCTION_LINES})",
    ]
