"""Registration of destination-passing custom ops with an eager fast path, for every family.

:func:`destination_op` registers a function as ``torch.ops.ifk.<name>`` (``torch.library.custom_op``
plus the trivial fake: the op returns nothing, it writes into its ``mutates_args``), so
``torch.compile`` and ``torch.library.opcheck`` see one op. It returns an :class:`EagerOp`: called
in eager mode it runs the function directly, skipping the dispatcher's Python round trip (schema
parsing, argument re-binding, autograd/ADInplaceOrView layers: ~20-100 us per call, which dominates
a batch-1 decode step on CPU); while ``torch.compile`` traces, or a dispatch mode is active (fake
tensors, ``make_fx``, flop counters), it calls the registered op. In eager
mode the call still shows in ``torch.profiler`` as ``ifk::<name>`` (a ``record_function`` entered
only while a profiler runs, so it costs nothing otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.profiler as autograd_profiler


class EagerOp:
    """A registered ``ifk::<name>`` op that eager callers reach without the dispatcher."""

    def __init__(self, name: str, fn: Callable[..., None]) -> None:
        self.name = f"ifk::{name}"
        self.fn = fn
        self.op = getattr(torch.ops.ifk, name).default  # the registered op (compile, opcheck)

    def __call__(self, *args) -> None:
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return self.op(*args)
        if autograd_profiler._is_profiler_enabled:
            with torch.profiler.record_function(self.name):
                return self.fn(*args)
        return self.fn(*args)


def destination_op(
    name: str, mutates_args: Sequence[str], fake: Callable[..., None] | None = None
) -> Callable[[Callable[..., None]], EagerOp]:
    """Decorator: register ``fn`` as ``torch.ops.ifk.<name>`` (schema from its annotations; it must
    return ``None`` and write only into ``mutates_args``) and return its :class:`EagerOp`. ``fake``,
    when given, is the fake implementation instead of the trivial one (e.g. one that checks the
    shapes, so a bad call fails while ``torch.compile`` traces); it too returns ``None``."""

    def register(fn: Callable[..., None]) -> EagerOp:
        op = torch.library.custom_op(f"ifk::{name}", mutates_args=tuple(mutates_args))(fn)
        op.register_fake(fake or _no_output)
        return EagerOp(name, fn)

    return register


def _no_output(*args) -> None:
    """The fake (meta) implementation of every destination-passing op: nothing to allocate."""
    return None
