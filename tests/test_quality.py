"""The code-quality gates run as tests: ruff, mypy --strict and the import-linter contracts.

They run the tools from the same virtualenv as pytest, on the whole tree, so CI fails on a lint
or typing error or on a broken layering contract exactly as it fails on a broken test.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param((str(BIN / "ruff"), "check", "."), id="ruff-check"),
        pytest.param((str(BIN / "ruff"), "format", "--check", "."), id="ruff-format"),
        pytest.param((str(BIN / "mypy"),), id="mypy-strict"),
        pytest.param((str(BIN / "lint-imports"), "--no-cache"), id="import-contracts"),
    ],
)
def test_tool_is_clean(command: tuple[str, ...]) -> None:
    result = _run(*command)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


def test_import_contracts_cover_the_pure_modules() -> None:
    """The purity contract must name every pure module, or a new one could import asyncio unseen."""
    text = (ROOT / "pyproject.toml").read_text()
    for module in ("proxy.protocols", "proxy.table", "proxy.balancing"):
        assert f'"{module}"' in text
