"""The LoRA kernels compile for an H100 (sm_90) through Triton's GPU pipeline and ptxas, on any machine.

The interpreter runs the kernels' arithmetic but not the GPU compiler; this catches what only the
compiler rejects (types, constexpr use, layouts) and register spills of the chosen launch configs.
It runs in a subprocess, because this test session decorated the kernels for the interpreter.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import re, subprocess, sys, tempfile
    from pathlib import Path
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton_kernels.lora import fused, shrink_expand as se

    INDEX = ("order_ptr", "counts_ptr", "starts_ptr", "ids_ptr", "ranks_ptr")

    def compile_sm90(fn, constexprs, warps, out_fp32=False, in_fp32=False):
        sig = {}
        for i, name in enumerate(fn.arg_names):
            if fn.params[i].is_constexpr or name in constexprs:
                sig[name] = "constexpr"
            elif name in INDEX:
                sig[name] = "*i32"
            elif name.endswith("_ptr"):
                fp32 = (out_fp32 and name == "out_ptr") or (in_fp32 and name == "in_ptr")
                sig[name] = "*fp32" if fp32 else "*bf16"
            else:
                sig[name] = "fp32" if name in ("scale", "scaling") else "i32"
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        cubin = Path(tempfile.mkdtemp()) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True)
        stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
        print(fn.__name__, constexprs, "stack bytes:", stack)
        assert stack == 0, f"{fn.__name__} spills registers ({stack} bytes of stack) with {constexprs}"

    common = dict(BLOCK_M=16, DOT_PRECISION="tf32")
    compile_sm90(se._lora_shrink_kernel, dict(common, BLOCK_N=16, BLOCK_K=se.SHRINK_BLOCK_K), 4,
                 out_fp32=True)
    compile_sm90(se._lora_expand_kernel, dict(common, ADD_INPUTS=True, BLOCK_N=se.EXPAND_BLOCK_N, BLOCK_K=16,
                                              N_TILES=32), 4, in_fp32=True)
    for slices, max_r, bm, ranks in [(3, 64, 16, True), (3, 16, 64, False), (1, 64, 64, True)]:
        s_pad = triton.next_power_of_2(slices)
        mid = min(fused.MID_RANK_CLASS, max_r)
        meta = dict(NUM_SLICES=slices, S_PAD=s_pad, HAS_RANKS=ranks, MID_R_BLOCK=mid, MAX_R_BLOCK=max_r,
                    BLOCK_K_LOW=fused._block_k(s_pad, 16), BLOCK_K_MID=fused._block_k(s_pad, mid),
                    BLOCK_K_MAX=fused._block_k(s_pad, max_r), BLOCK_M=bm, BLOCK_N=fused.FUSED_BLOCK_N,
                    DOT_PRECISION="tf32")
        warps = 8 if bm * s_pad * max_r >= fused.FUSED_WIDE_TILE else 4
        compile_sm90(fused._add_lora_linear_kernel, meta, warps)
    """
)


def _ptxas_present() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton install has no bundled ptxas")
def test_kernels_compile_for_sm90_without_spills():
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
