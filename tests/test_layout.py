"""Repository layout rules that keep the package honest."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaguar"


def test_no_library_function_is_named_like_a_test():
    """pytest collects a `test_*` function wherever a test module imports it, and runs it as a test."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and node.name.lower().startswith("test")]
    assert not offenders, f"rename these library names (pytest would collect them): {offenders}"
