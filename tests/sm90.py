"""Compile the Triton kernels for an H100 (sm_90) through Triton's GPU pipeline and ptxas, on any
machine, in exactly the variants the launchers use: catches what only the GPU compiler rejects
(types, constexpr use, layouts) and register spills, which the interpreter cannot see.

How: a test file names cases, each one call of a public op on small CPU tensors. With the Triton
backend forced, :func:`record_launches` swaps every Triton kernel's launch (``kernel[grid](...)``)
for a recorder, whichever kernel the launcher picks and however it is named, so refactors of the
launchers need no change here. The recorder keeps the arguments as Triton sees them (tensor dtype
and 16-byte alignment, ints, floats, constexprs, ``num_warps``...). A subprocess without
``TRITON_INTERPRET`` (this session decorated the kernels for the interpreter) then binds each launch
with Triton's own specializer for an sm_90 target - ints equal to 1 become constexprs, multiples of
16 and aligned pointers get divisibility hints, as on a real GPU - compiles it and reads the stack
and register use of the cubin with ``cuobjdump``. Zero stack bytes = no register spills.

A test file is three lines of machinery::

    CASES = {"decode_bf16": lambda: my_public_op(...), ...}
    sm90_results = results_fixture(CASES)

    @needs_ptxas
    @pytest.mark.parametrize("case", case_params(CASES))
    def test_compiles_for_sm90_without_spills(sm90_results, case):
        assert_no_spills(sm90_results, case)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
Case = Callable[[], object]


def _nvidia_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


needs_ptxas = pytest.mark.skipif(
    not _nvidia_tool("ptxas").exists(), reason="this Triton install has no bundled ptxas"
)


# ---- recording (in the test process) --------------------------------------------------------------
def _encode(value: object) -> object:
    """A launch argument as JSON: tensors by dtype and alignment (all Triton specializes on)."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"sm90 recorder: cannot record launch argument {value!r} ({type(value).__name__})")


def record_launches(call: Case) -> list[dict]:
    """Run ``call`` with the Triton backend forced on CPU tensors and every Triton launch recorded
    instead of run; returns the launches in order (kernel module and name, args, kwargs)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from triton_kernels.backend import use_backend

    launches: list[dict] = []

    def record(kernel, *args, grid, warmup, **kwargs) -> None:
        if not warmup:
            launches.append({
                "module": kernel.fn.__module__, "kernel": kernel.fn.__name__,
                "args": [_encode(a) for a in args], "kwargs": {k: _encode(v) for k, v in kwargs.items()},
            })

    with pytest.MonkeyPatch.context() as mp, use_backend("triton"), torch.no_grad():
        mp.setenv("TRITON_INTERPRET", "1")  # the triton backend takes CPU tensors; the kernels never run
        for cls in (InterpretedFunction, JITFunction):  # interpreter-decorated, or real on a GPU machine
            mp.setattr(cls, "run", record)
        torch.manual_seed(0)
        call()
    return launches


# ---- compiling (in a subprocess without the interpreter) -------------------------------------------
class _Pointer:
    """What Triton's specializer reads from a tensor argument: its dtype and data pointer."""

    def __init__(self, dtype: torch.dtype, aligned: bool) -> None:
        self.dtype, self._ptr = dtype, 1024 if aligned else 1026

    def data_ptr(self) -> int:
        return self._ptr


def _decode(value: object) -> object:
    import triton.language as tl

    if isinstance(value, dict) and "tensor" in value:
        return _Pointer(getattr(torch, value["tensor"]), value["aligned"])
    if isinstance(value, dict) and "tl_dtype" in value:
        return getattr(tl, value["tl_dtype"])
    return value


def _resource_usage(compiled) -> dict:
    cubin = Path(tempfile.mkdtemp()) / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(_nvidia_tool("cuobjdump")), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    return {"stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1))}


def compile_launch(launch: Mapping) -> dict:
    """Compile one recorded launch for sm_90 as ``JITFunction.run`` would on an H100; returns
    ``{"stack": bytes, "registers": n}``. Uses Triton 3.9's binder and ``_pack_args``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    while not isinstance(kernel, JITFunction):  # autotuner / heuristics wrappers
        kernel = kernel.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_decode(a) for a in launch["args"]]
    kwargs = {"debug": False, **{k: _decode(v) for k, v in launch["kwargs"].items()}}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return _resource_usage(triton.compile(src, target=target, options=options.__dict__))


def _compile_file(launches_json: str, results_json: str) -> None:
    """Subprocess entry: compile every launch in ``launches_json`` (id -> launch), errors included."""
    import traceback

    results = {}
    for key, launch in json.loads(Path(launches_json).read_text()).items():
        try:
            results[key] = compile_launch(launch)
        except Exception:  # one broken variant must not hide the others
            results[key] = {"error": traceback.format_exc()[-3000:]}
    Path(results_json).write_text(json.dumps(results))


def compile_launches(launches: Mapping[str, dict], jobs: int = 2) -> dict[str, dict]:
    """Compile ``launches`` (key -> launch) in ``jobs`` subprocesses side by side; key -> result."""
    keys = sorted(launches, key=lambda k: (launches[k]["kernel"], k))
    groups = [keys[i::jobs] for i in range(jobs) if keys[i::jobs]]
    tmp = Path(tempfile.mkdtemp(prefix="sm90-"))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    procs = []
    for i, group in enumerate(groups):
        src, dst = tmp / f"launches{i}.json", tmp / f"results{i}.json"
        src.write_text(json.dumps({k: launches[k] for k in group}))
        code = f"from tests.sm90 import _compile_file; _compile_file({str(src)!r}, {str(dst)!r})"
        procs.append((subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), dst))
    results: dict[str, dict] = {}
    for proc, dst in procs:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"sm_90 compile subprocess failed:\n{output[-4000:]}"
        results |= json.loads(dst.read_text())
    return results


# ---- the test-file side -------------------------------------------------------------------------
def results_fixture(cases: Mapping[str, Case]):
    """A module-scoped fixture: case -> list of results, one per launch the case made (identical
    launches compiled once). A case that launched nothing gets an error result."""

    @pytest.fixture(scope="module")
    def sm90_results() -> dict[str, list[dict]]:
        recorded = {case: record_launches(call) for case, call in cases.items()}
        unique = {json.dumps(launch, sort_keys=True): launch for launches in recorded.values() for launch in launches}
        compiled = compile_launches(unique, jobs=min(2, os.cpu_count() or 1))
        results = {}
        for case, launches in recorded.items():
            results[case] = [{**compiled[json.dumps(launch, sort_keys=True)], "launch": launch}
                             for launch in launches] or [{"error": "no Triton launch recorded"}]
            for res in results[case]:
                launch = res.get("launch", {"kernel": "-", "kwargs": {}})
                usage = "ERROR" if "error" in res else f"{res['registers']:3d} registers, stack {res['stack']} bytes"
                print(f"sm_90 {case:36s} {launch['kernel']:32s} num_warps={launch['kwargs'].get('num_warps')}: {usage}")
        return results

    return sm90_results


def case_params(cases: Mapping[str, Case], spills: Mapping[str, str] | None = None) -> list:
    """The case ids, with the known spills (``id -> reason``) as strict xfails."""
    spills = spills or {}
    return [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=spills[c])) if c in spills else c
            for c in cases]


def assert_no_spills(results: Mapping[str, list[dict]], case: str) -> None:
    for res in results[case]:
        assert "error" not in res, res["error"]
        launch = res["launch"]
        assert res["stack"] == 0, (
            f"{case}: {launch['kernel']} spills: {res['stack']} stack bytes, {res['registers']} registers "
            f"(kwargs {launch['kwargs']})"
        )
