"""transformers and peft are optional: importing pyiface (and pyiface.integrations) imports neither."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_importing_pyiface_imports_neither_transformers_nor_peft():
    code = ("import sys, pyiface, pyiface.integrations, triton_kernels; "
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
