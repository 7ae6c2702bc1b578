"""What pipeline-parallel stages hand each other: named tensors, their empty factory, and the
placeholder module for layers that live on another stage (vLLM's ``IntermediateTensors``,
``make_empty_intermediate_tensors_factory`` and ``PPMissingLayer``)."""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False, repr=False)
class IntermediateTensors:
    """The tensors one PP stage sends to the next, by name (usually ``hidden_states``, ``residual``).

    ``it["hidden_states"]`` returns a tensor; ``it[a:b]`` returns a new ``IntermediateTensors``
    with every tensor sliced on its first (token) dim. Two of them are equal when they hold the
    same names and ``torch.equal`` tensors.

    Example:
        >>> it = IntermediateTensors({"hidden_states": torch.ones(4, 8)})
        >>> it[1:3]["hidden_states"].shape
        torch.Size([2, 8])
    """

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, key: str | slice) -> Any:
        if isinstance(key, str):
            return self.tensors[key]
        if isinstance(key, slice):
            return type(self)({name: t[key] for name, t in self.tensors.items()})
        raise TypeError(f"IntermediateTensors keys are names (str) or token slices, got {key!r}")

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self.tensors.items()

    def __len__(self) -> int:
        return len(self.tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IntermediateTensors):
            return NotImplemented
        return self.tensors.keys() == other.tensors.keys() and all(
            torch.equal(t, other.tensors[name]) for name, t in self.tensors.items()
        )

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}=[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')} {t.device}"
            for name, t in self.tensors.items()
        )
        return f"IntermediateTensors({fields})"


def make_empty_intermediate_tensors_factory(
    keys: Iterable[str], hidden_size: int
) -> Callable[[int, torch.dtype, torch.device], IntermediateTensors]:
    """A ``make_empty_intermediate_tensors(batch_size, dtype, device)`` for a model's PP stages.

    It returns zeros ``[batch_size, hidden_size]`` under each of ``keys``; a stage other than
    the first uses it to allocate what it receives (vLLM also calls it when profiling).
    """
    keys = tuple(keys)

    def make_empty_intermediate_tensors(
        batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        return IntermediateTensors(
            {key: torch.zeros((batch_size, hidden_size), dtype=dtype, device=device) for key in keys}
        )

    return make_empty_intermediate_tensors


class PPMissingLayer(torch.nn.Identity):
    """Stands in for a layer that another PP stage holds: no parameters, and ``forward``
    returns its first argument (positional, else the first keyword) unchanged.

    Keeping one entry per layer keeps layer indices and weight names the same on every stage.
    Constructor arguments are accepted and ignored, so it can replace any layer class.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            return args[0]
        if kwargs:
            return next(iter(kwargs.values()))
        raise TypeError("PPMissingLayer.forward needs an input to pass through")
