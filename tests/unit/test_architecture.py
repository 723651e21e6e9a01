"""The import contract of docs/architecture.md, checked by the real `lint-imports` (pyproject [tool.importlinter])."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_import_contract_holds():
    proc = lint_imports()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_a_broken_contract_fails(tmp_path):
    """The checker sees lazy imports (the driver imports learner.worker inside a function)."""
    contract = tmp_path / "contract.toml"
    contract.write_text('[tool.importlinter]\nroot_packages = ["cluster", "learner"]\n\n'
                        '[[tool.importlinter.contracts]]\nname = "driver without the learner"\ntype = "forbidden"\n'
                        'source_modules = ["cluster.driver"]\nforbidden_modules = ["learner.worker"]\n')
    proc = lint_imports("--config", str(contract))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 broken" in proc.stdout and "cluster.driver" in proc.stdout
