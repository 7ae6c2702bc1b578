"""Helpers every test uses: the kernel device, poisoned outputs, and error-reporting asserts."""

from __future__ import annotations

import torch

# The device Triton kernels run on here: the GPU when present, else CPU under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Relative-error budgets (||out - ref|| / ||ref||) against a float64/float32 reference.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

INT_POISON = -123456789


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floats) or a large negative sentinel (ints) so unwritten output shows."""
    return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)


def poisoned(shape, dtype: torch.dtype, device: torch.device | str = KERNEL_DEVICE) -> torch.Tensor:
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.any() else ()


def assert_equal(out: torch.Tensor, ref: torch.Tensor, name: str = "out") -> None:
    """Exact match (index and copy kernels), NaN never equal."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    bad = out != ref
    if out.is_floating_point():
        bad |= torch.isnan(out) | torch.isnan(ref)
    if bad.any():
        idx = _first_bad(bad)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {out.numel()} elements differ; first at {idx}: "
            f"{out[idx].item()} != {ref[idx].item()}"
        )


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float | None = None, name: str = "out") -> None:
    """``||out - ref|| / ||ref|| <= tol`` (default from REL_TOL by out's dtype), no NaN/inf."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = REL_TOL[out.dtype] if tol is None else tol
    o, r = out.double(), ref.double()
    nonfinite = ~torch.isfinite(o)
    if nonfinite.any():
        raise AssertionError(f"{name}: {int(nonfinite.sum())} non-finite values, first at {_first_bad(nonfinite)}")
    err = (o - r).abs()
    rel = (err.norm() / r.norm().clamp_min(1e-30)).item()
    if rel > tol:
        idx = _first_bad(err > tol * r.abs().max().clamp_min(1e-30))
        raise AssertionError(
            f"{name}: relative error {rel:.3e} > {tol:.1e}; max abs error {err.max().item():.3e}; "
            f"first bad index {idx}: {o[idx].item() if idx else None} vs {r[idx].item() if idx else None}"
        )


def mixer_output_and_grads(mixer: torch.nn.Module, hidden: torch.Tensor, cot: torch.Tensor) -> list[torch.Tensor]:
    """``[out, d hidden, d param...]`` of ``(mixer(hidden) * cot).sum()``: a mixer's forward and every
    gradient, for comparing two implementations of it."""
    mixer.zero_grad()
    h = hidden.clone().requires_grad_()
    out = mixer(h)
    (out * cot).sum().backward()
    return [out.detach(), h.grad] + [p.grad.clone() for p in mixer.parameters()]


def backends(op, *more) -> list[str]:
    """The backends of a registry :class:`~triton_kernels.backend.Op` that run here: each one it has,
    ``cuda`` only on a GPU (the ``triton`` backend runs under the interpreter on CPU). With ``more``
    ops (a composite such as ``mamba_inner_fn`` forces one backend on each op it calls): the backends
    every one of them has."""
    return [b for b in op.backends if (b != "cuda" or torch.cuda.is_available())
            and all(b in other.backends for other in more)]


def rnd(*shape, dtype: torch.dtype = torch.float32, scale: float = 1.0, generator: torch.Generator | None = None,
        device: torch.device | str = KERNEL_DEVICE) -> torch.Tensor:
    """Random normal inputs (never zeros) scaled by ``scale``."""
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float32)).to(dtype=dtype, device=device)
