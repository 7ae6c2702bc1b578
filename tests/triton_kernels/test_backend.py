"""Backend choice: automatic by device, IFK_BACKEND, use_backend, and forced-backend errors."""

import pytest
import torch

from triton_kernels import BackendUnavailableError, _csrc, use_backend
from triton_kernels.backend import forced_backend, select_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("IFK_BACKEND", raising=False)


@pytest.mark.parametrize(
    ("device", "interpret", "native", "prefer_cuda", "expected"),
    [
        pytest.param(CUDA, "0", frozenset(), False, "triton", id="cuda-default-triton"),
        pytest.param(CUDA, "0", frozenset({"cuda"}), False, "triton", id="cuda-kernel-not-measured-faster"),
        pytest.param(CUDA, "0", frozenset({"cuda"}), True, "cuda", id="cuda-kernel-measured-faster"),
        pytest.param(CPU, "1", frozenset({"cpu"}), False, "triton", id="cpu-interpreter"),
        pytest.param(CPU, "0", frozenset({"cpu"}), False, "cpu", id="cpu-kernel"),
        pytest.param(CPU, "0", frozenset(), False, "torch", id="cpu-reference"),
    ],
)
def test_automatic_choice(no_env, monkeypatch, device, interpret, native, prefer_cuda, expected):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert select_backend("op", device, native=native, prefer_cuda=prefer_cuda) == expected


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
        select_backend("op", CPU)


@pytest.mark.parametrize(
    ("forced", "device", "native", "interpret", "reason"),
    [
        pytest.param("cuda", CPU, frozenset({"cuda"}), "1", "needs CUDA tensors", id="cuda-on-cpu"),
        pytest.param("cuda", CUDA, frozenset(), "0", "has no cuda kernel", id="cuda-missing"),
        pytest.param("cpu", CPU, frozenset(), "0", "has no cpu kernel", id="cpu-missing"),
        pytest.param("cpu", CUDA, frozenset({"cpu"}), "0", "needs CPU tensors", id="cpu-on-cuda"),
        pytest.param("triton", CPU, frozenset(), "0", "TRITON_INTERPRET=1", id="triton-on-cpu-no-interpreter"),
    ],
)
def test_forced_backend_that_cannot_run_raises(no_env, monkeypatch, forced, device, native, interpret, reason):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with use_backend(forced), pytest.raises(BackendUnavailableError, match=reason):
        select_backend("my_op", device, native=native)


def test_failed_build_raises_when_forced_and_warns_otherwise(monkeypatch):
    monkeypatch.setitem(_csrc.EXTENSIONS, "broken", (("does/not/exist.cpp",), False))
    monkeypatch.setattr(_csrc, "_failed", {})
    with pytest.raises(_csrc.ExtensionBuildError, match="could not build csrc extension 'broken'"):
        _csrc.try_load("broken", forced=True)
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend"):
        assert not _csrc.try_load("broken", forced=False)
