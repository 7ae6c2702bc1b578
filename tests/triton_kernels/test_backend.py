"""Backend choice: automatic by device and dtype, IFK_BACKEND, use_backend, forced-backend errors, and
the registry every op is declared in."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from triton_kernels import BackendUnavailableError, _csrc, backend, registry, use_backend
from triton_kernels.backend import BACKENDS, Op, forced_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _op(native=(), prefer_cuda=False) -> Op:
    return Op("my_op", reference="triton_kernels.registry:OPS",
              native={b: "multimodal_cuda" if b == "cuda" else "mamba_cpu" for b in native},
              prefer_cuda=prefer_cuda)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("IFK_BACKEND", raising=False)


@pytest.mark.parametrize(
    ("device", "interpret", "native", "prefer_cuda", "dtypes", "expected"),
    [
        pytest.param(CUDA, "0", (), False, (), "triton", id="cuda-default-triton"),
        pytest.param(CUDA, "0", ("cuda",), False, (), "triton", id="cuda-kernel-not-measured-faster"),
        pytest.param(CUDA, "0", ("cuda",), True, (), "cuda", id="cuda-kernel-measured-faster"),
        pytest.param(CUDA, "0", ("cuda",), True, (torch.float64,), "torch", id="cuda-float64-torch"),
        pytest.param(CPU, "1", ("cpu",), False, (), "triton", id="cpu-interpreter"),
        pytest.param(CPU, "1", (), False, (torch.float16, torch.float64), "torch", id="cpu-interpreter-float64"),
        pytest.param(CPU, "0", ("cpu",), False, (), "cpu", id="cpu-kernel"),
        pytest.param(CPU, "0", (), False, (), "torch", id="cpu-reference"),
    ],
)
def test_automatic_choice(no_env, monkeypatch, device, interpret, native, prefer_cuda, dtypes, expected):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(backend, "_warned_slow", {"my_op"})  # the interpreter warning: tested below
    assert _op(native, prefer_cuda).select(device, dtypes) == expected


def test_env_and_context_override(no_env, monkeypatch):
    monkeypatch.setenv("IFK_BACKEND", "torch")
    assert forced_backend() == "torch"
    with use_backend("triton"):
        assert forced_backend() == "triton"
        with use_backend(None):
            assert forced_backend() == "torch"
    assert forced_backend() == "torch"


def test_bad_names_raise(no_env, monkeypatch):
    with pytest.raises(ValueError, match="use_backend='tritn'"), use_backend("tritn"):
        pass
    monkeypatch.setenv("IFK_BACKEND", "gpu")
    with pytest.raises(ValueError, match="IFK_BACKEND='gpu'"):
        _op().select(CPU)


@pytest.mark.parametrize(
    ("forced", "device", "native", "interpret", "dtypes", "reason"),
    [
        pytest.param("cuda", CPU, ("cuda",), "1", (), "needs CUDA tensors", id="cuda-on-cpu"),
        pytest.param("cuda", CUDA, (), "0", (), "has no cuda kernel", id="cuda-missing"),
        pytest.param("cpu", CPU, (), "0", (), "has no cpu kernel", id="cpu-missing"),
        pytest.param("cpu", CUDA, ("cpu",), "0", (), "needs CPU tensors", id="cpu-on-cuda"),
        pytest.param("triton", CPU, (), "0", (), "TRITON_INTERPRET=1", id="triton-on-cpu-no-interpreter"),
        pytest.param("triton", CPU, (), "1", (torch.float64,), "not float64", id="triton-float64"),
    ],
)
def test_forced_backend_that_cannot_run_raises(no_env, monkeypatch, forced, device, native, interpret, dtypes,
                                               reason):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with use_backend(forced), pytest.raises(BackendUnavailableError, match=reason):
        _op(native).select(device, dtypes)


def test_failed_build_raises_when_forced_and_warns_otherwise(monkeypatch):
    monkeypatch.setitem(_csrc.EXTENSIONS, "broken", (("does/not/exist.cpp",), False))
    monkeypatch.setattr(_csrc, "_failed", {})
    with pytest.raises(_csrc.ExtensionBuildError, match="could not build csrc extension 'broken'"):
        _csrc.try_load("broken", forced=True)
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend"):
        assert not _csrc.try_load("broken", forced=False)


def test_resolve_reports_torch_when_the_native_build_failed(no_env, monkeypatch):
    """What plan() shows is what runs: an automatic cpu choice whose build fails resolves to torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(_csrc.EXTENSIONS, "broken", (("does/not/exist.cpp",), False))
    monkeypatch.setattr(_csrc, "_failed", {})
    op = Op("my_op", reference="triton_kernels.registry:OPS", native={"cpu": "broken"})
    assert op.select(CPU) == "cpu"
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert op.resolve(CPU) == "torch"


@pytest.mark.parametrize("name", sorted(registry.OPS))
def test_registry_declares_runnable_ops(name):
    """Every declared op: its reference imports, its native backends name a csrc extension, and its
    custom op is registered under its name."""
    op = registry.OPS[name]
    assert callable(op.reference_fn())
    assert set(op.native) <= {"cuda", "cpu"}
    assert all(ext in _csrc.EXTENSIONS for ext in op.native.values())
    assert {"triton", "torch"} <= set(op.backends) <= set(BACKENDS)

    assert any(n == name or n.startswith(name + "_") for n in dir(torch.ops.ifk)), \
        f"no torch.ops.ifk.{name}* custom op registered"


# ---- TRITON_INTERPRET: set too late, and shadowing a cpu kernel -------------------------------------


@pytest.fixture
def late_interpreter(no_env, monkeypatch):
    """TRITON_INTERPRET=1 now, but the kernels were decorated without it, on a machine without CUDA."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "_KERNELS_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_interpreter_set_after_import_is_explained(late_interpreter):
    with pytest.raises(BackendUnavailableError, match="set TRITON_INTERPRET=1 before importing triton_kernels"):
        _op().select(CPU)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="was set after triton_kernels"):
        _op().select(CPU)
    with use_backend("torch"):
        assert _op().select(CPU) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the finding is a CPU-only machine's: no GPU driver")
def test_interpreter_set_after_import_end_to_end():
    """The finding: setting TRITON_INTERPRET=1 after ``import triton_kernels`` gave Triton's raw "0 active
    drivers" on a CPU tensor."""
    code = ("import os, torch, triton_kernels\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    triton_kernels.rms_norm_gated(torch.randn(2, 8), torch.ones(8))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IFK_BACKEND")}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(root)}, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert "BackendUnavailableError" in res.stdout, res.stdout + res.stderr
    assert "set TRITON_INTERPRET=1 before importing triton_kernels" in res.stdout


@pytest.fixture
def interpreter(no_env, monkeypatch):
    """The interpreter on (and on when the kernels were decorated), no op warned yet."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "_KERNELS_INTERPRETED", True)
    monkeypatch.setattr(backend, "_warned_slow", set())


def test_interpreter_shadowing_a_cpu_kernel_warns_once_per_op(interpreter):
    """The finding: TRITON_INTERPRET=1 exported for a shell made a small CPU scan take 72 s instead of
    0.05 s, silently. Now the automatic choice warns, once per op."""
    op, other = _op(native=("cpu",)), Op("other_op", reference="triton_kernels.registry:OPS", native={"cpu": "x"})
    with pytest.warns(RuntimeWarning, match=r"my_op: TRITON_INTERPRET=1 .* IFK_BACKEND=cpu or use_backend\('cpu'\)"):
        assert op.select(CPU) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op.select(CPU) == "triton"  # once per op
    with pytest.warns(RuntimeWarning, match="other_op"):
        other.select(CPU)


@pytest.mark.parametrize("case", ["forced-triton", "no-cpu-kernel", "float64"])
def test_interpreter_warning_only_for_an_automatic_choice_with_a_cpu_kernel(interpreter, case):
    """Tests that force the backend (the suite's own interpreter runs) and ops without a cpu kernel stay quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if case == "forced-triton":
            with use_backend("triton"):
                assert _op(native=("cpu",)).select(CPU) == "triton"
        elif case == "no-cpu-kernel":
            assert _op().select(CPU) == "triton"
        else:
            assert _op(native=("cpu",)).select(CPU, (torch.float64,)) == "torch"


def test_suite_does_not_turn_warnings_into_errors():
    """The interpreter warning must stay a warning in this suite's own runs (pyproject's filterwarnings)."""
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert not re.search(r"filterwarnings\s*=.*\berror\b", text, re.S)
