"""Compile Triton kernels for an H100 (sm_90) through Triton's GPU pipeline and ptxas, on any
machine: catches what only the GPU compiler rejects (types, constexpr use, layouts) and register
spills of the chosen launch configs, which the interpreter cannot see.

The kernels must be decorated without the interpreter, so the check runs in a subprocess:
``run_sm90_script(body)`` executes ``body`` (which calls :func:`compile_sm90`) there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int) -> int:
    """Compile ``fn`` for sm_90 and return the stack bytes it uses (0 = no register spills).

    ``signature`` gives a Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``...) for every
    non-constexpr argument; ``constexprs`` the value of every constexpr argument.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = Path(tempfile.mkdtemp()) / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([str(_nvidia_tool("cuobjdump")), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    print(fn.__name__, constexprs, "num_warps", num_warps, "stack bytes", stack)
    return stack


needs_ptxas = pytest.mark.skipif(
    not _nvidia_tool("ptxas").exists(), reason="this Triton install has no bundled ptxas"
)


def run_sm90_script(body: str) -> None:
    """Run ``body`` in a fresh interpreter without TRITON_INTERPRET; fail with its output."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    script = "from tests.sm90 import compile_sm90\n" + body
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
