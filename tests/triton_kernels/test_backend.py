"""Backend choice: automatic by device and dtype, IFK_BACKEND, use_backend, forced-backend errors, and
the registry every op is declared in."""

import pytest
import torch

from triton_kernels import BackendUnavailableError, _csrc, registry, use_backend
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
