"""The package's layers hold: import-linter's contracts in pyproject.toml (function-level imports included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """Layers import downward, front ends are independent, the runtime is torch-free, no sibling cycles."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_runtime_imports_without_torch():
    """Importing the runtime and running its front ends' imports never loads torch or transformers."""
    code = (
        "import sys, llava_ov.runtime.pipeline, llava_ov.runtime.chat, llava_ov.frontends.server.app;"
        "bad = [m for m in ('torch', 'transformers', 'nncf') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
