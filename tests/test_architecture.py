"""The layers of docs/architecture.md, as import-linter contracts (pyproject.toml), checked on every test run."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 kept, 0 broken" in result.stdout, result.stdout


def test_a_sampler_that_imports_the_learner_breaks_a_contract(tmp_path):
    shutil.copytree(ROOT / "rl", tmp_path / "rl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    pool = tmp_path / "rl" / "sampler" / "pool.py"
    pool.write_text(pool.read_text() + "\nimport rl.learner  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "the sampler never imports the learner, nor the learner the sampler BROKEN" in result.stdout, result.stdout
    assert "rl.sampler.pool -> rl.learner" in result.stdout, result.stdout
