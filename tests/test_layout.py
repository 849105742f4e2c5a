"""The driver's shape (issue: the driver in small parts): no function over 80 lines and no
``nonlocal`` in ``lumina/loop.py`` and ``lumina/driver/``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lumina"
DRIVER = [ROOT / "loop.py", *sorted((ROOT / "driver").glob("*.py"))]


@pytest.mark.parametrize("path", DRIVER, ids=lambda p: p.name)
def test_driver_functions_are_short_and_share_no_closure_state(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= 80, f"{path.name}:{node.lineno} {node.name} is {lines} lines"
        assert not isinstance(node, ast.Nonlocal), f"{path.name}:{node.lineno} uses nonlocal"
