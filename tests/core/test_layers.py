"""The import contracts of pyproject.toml ([tool.importlinter]) hold for this checkout.

Each contract runs through import-linter in a subprocess whose cwd and PYTHONPATH are the checkout,
so the tree under test is the one analysed (not an installed copy). `.ci/run` runs `lint-imports`
too; this test makes a plain `pytest` catch a broken layer as well.
"""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def _lint(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("contract", [c["id"] for c in CONTRACTS])
def test_import_contract_is_kept(contract):
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    proc = _lint("--contract", contract)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_contracts_cover_every_package():
    """Every top-level package is in the layers contract and (except cli) may not import cli."""
    packages = {p.name for p in (ROOT / "efficientml").iterdir() if (p / "__init__.py").is_file()}
    by_id = {c["id"]: c for c in CONTRACTS}
    layered = {m.strip("() ").removeprefix("efficientml.")
               for layer in by_id["layers"]["layers"] for m in layer.replace("|", ":").split(":")}
    assert packages <= layered, f"add {sorted(packages - layered)} to the layers contract"
    sources = {m.removeprefix("efficientml.") for m in by_id["no-cli"]["source_modules"]}
    assert sources == packages - {"cli"}


def test_a_broken_layer_is_reported(tmp_path):
    """The check can fail: a contract the tree breaks (core above cli) is reported as broken."""
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "efficientml"\n\n'
                   '[[tool.importlinter.contracts]]\nid = "upside-down"\nname = "core above cli"\n'
                   'type = "layers"\nlayers = ["efficientml.core", "efficientml.cli"]\n')
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    proc = _lint(str(cfg))
    assert proc.returncode == 1
    assert "0 kept, 1 broken" in proc.stdout
    assert "efficientml.core is not allowed to import efficientml.cli" not in proc.stdout
    assert "efficientml.cli is not allowed to import efficientml.core" in proc.stdout
