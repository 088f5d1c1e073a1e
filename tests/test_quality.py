"""The code-quality gates run as tests: ruff, mypy --strict and the import-linter contracts.

They run the tools from the same virtualenv as pytest, on the whole tree, so CI fails on a lint
or typing error or on a broken layering contract exactly as it fails on a broken test.
"""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import cast

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


# What a sans-IO module must never import (design.md: no asyncio, socket, ssl or clocks inside),
# and the modules that must be held to it. The controller's core may use datetime to convert YAML
# timestamps; it reads no clock with it.
NO_IO = {"asyncio", "socket", "ssl", "time", "selectors", "uvloop", "logging", "prometheus_client"}
PURE = {
    "Protocol machines and the table contract are pure (no I/O, no clocks)": (
        {"proxy.protocols", "proxy.table", "proxy.balancing"},
        NO_IO | {"datetime"},
    ),
    "The controller's core is pure: no kopf, no HTTP, no event loop, no clocks, no logging": (
        {"controller.compiler", "controller.mailroute", "controller.conditions", "controller.endpoints"},
        NO_IO | {"kopf", "aiohttp", "kubernetes"},
    ),
    "The push channel's shared rules (proxy.push) read a file and nothing more: no event loop, "
    "network, HTTP, clocks or logging": ({"proxy.push"}, NO_IO | {"aiohttp"}),
}


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {contract["name"]: contract for contract in config["tool"]["importlinter"]["contracts"]}


@pytest.mark.parametrize("name", sorted(PURE))
def test_import_contracts_cover_the_pure_modules(name: str) -> None:
    """The purity contracts name every pure module and forbid every I/O module, or a new
    module, or a new import, could bring I/O into the sans-IO core unseen."""
    sources, forbidden = PURE[name]
    contract = _contracts()[name]
    assert contract["type"] == "forbidden"
    assert sources <= set(cast(list[str], contract["source_modules"]))
    assert forbidden <= set(cast(list[str], contract["forbidden_modules"]))


@pytest.mark.parametrize(
    ("module", "line"),
    [
        pytest.param("proxy/protocols/imap.py", "import datetime", id="clock-in-a-machine"),
        pytest.param("controller/compiler.py", "import ssl", id="ssl-in-the-compiler"),
    ],
)
def test_import_contracts_catch_io_in_a_pure_module(tmp_path: Path, module: str, line: str) -> None:
    """lint-imports itself fails on a copy of the tree where a pure module imports I/O."""
    for top in ("proxy", "controller", "mailgress", "testbed"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    source = tmp_path / module
    source.write_text(source.read_text() + f"\n{line}\n")
    result = subprocess.run(
        (str(BIN / "lint-imports"), "--no-cache"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and line.rsplit(maxsplit=1)[-1] in result.stdout
