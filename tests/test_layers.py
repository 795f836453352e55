"""The package's layers import only downwards (import-linter's layers contract in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def _lint(src: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first, so the analysed package is the one under `src`, not the installed one.
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [*LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layers_contract_holds():
    result = _lint(ROOT / "src")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_an_upward_import_breaks_the_contract(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "safeproj", src / "safeproj", ignore=shutil.ignore_patterns("__pycache__"))
    options = src / "safeproj" / "core" / "options.py"
    options.write_text(options.read_text() + "\nfrom safeproj.callbacks import summary  # noqa: E402,F401\n")
    result = _lint(src)
    assert result.returncode != 0
    assert "safeproj.core is not allowed to import safeproj.callbacks" in result.stdout
