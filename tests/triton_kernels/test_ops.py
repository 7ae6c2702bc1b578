"""triton_kernels._ops: a destination op runs without the dispatcher in eager mode, shows in
torch.profiler as ``ifk::<name>``, and reaches the registered op under torch.compile and fake tensors."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from triton_kernels._ops import destination_op

CALLS: list[str] = []


@destination_op("test_ops_scale", mutates_args=("out",))
def _scale(out: torch.Tensor, inputs: list[torch.Tensor | None], factor: float) -> None:
    """out = inputs[0] * factor (inputs[1] unused: the list may hold None)."""
    CALLS.append("impl")
    out.copy_(inputs[0] * factor)


def test_eager_call_runs_the_function_and_shows_in_the_profiler():
    x, out = torch.randn(5), torch.full((5,), float("nan"))
    with torch.profiler.profile() as prof:
        _scale(out, [x, None], 2.0)
    torch.testing.assert_close(out, 2 * x)
    names = {e.name for e in prof.events()}
    assert "ifk::test_ops_scale" in names


def test_registered_op_passes_opcheck_and_compiles():
    x = torch.randn(4)
    torch.library.opcheck(_scale.op, (torch.empty(4), [x, None], 3.0))

    def f(t):
        out = torch.empty_like(t)
        _scale(out, [t, None], 3.0)
        return out

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), 3 * x)


def test_fake_tensors_take_the_registered_op():
    CALLS.clear()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3))
        _scale(torch.empty_like(x), [x, None], 1.0)
    assert CALLS == []  # the fake (no-op) implementation ran, not the function
