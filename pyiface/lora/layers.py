"""LoRA-enabled layers for model code: linear (plain or packed), LM head, embedding.

A :class:`LoRALinear` computes ``base(x)`` plus, for each token, the update of the adapter in
its slot (through the shared :class:`~pyiface.lora.LoRABatchWrapper`). A packed layer (``qkv_proj``
standing for ``q_proj``, ``k_proj``, ``v_proj``) holds one slot set per sub-module, one output
slice each, of its own width and rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyiface.lora.slots import LoRAEmbeddingSlots, LoRASlots, MaybePerSlice
from pyiface.lora.wrapper import LoRABatchWrapper


class LoRALinear(nn.Module):
    """``y = x @ W^T + b`` plus each token's LoRA update, for ``max_loras`` adapters.

    Args:
        base: the ``nn.Linear`` to extend (its weight and bias are shared, not copied, and keep
            their ``state_dict`` names), or a ``[out, in]`` weight tensor.
        wrapper: the model's :class:`LoRABatchWrapper` (token -> slot for the current step).
        max_rank: largest adapter rank.
        output_slices: widths of the packed sub-modules, summing to ``out_features``
            (default: one slice).
        bias: ``[out]`` bias when ``base`` is a tensor.
        trainable: the stacked adapter weights become parameters.

    Forward takes ``x[..., in]`` and returns ``[..., out]``; the leading dims flatten to the
    ``T`` tokens of the wrapper's mapping. Under autograd the update is differentiable in ``x``
    and in the stacked adapter weights (``trainable=True``).

    Example:
        >>> wrapper = LoRABatchWrapper(max_loras=2, max_num_tokens=8, device="cpu")
        >>> qkv = LoRALinear(nn.Linear(16, 32), wrapper, max_rank=4, output_slices=(16, 8, 8))
        >>> qkv.set_lora(1, [torch.randn(4, 16), None, torch.randn(2, 16)],
        ...              [torch.randn(16, 4), None, torch.randn(8, 2)], scaling=0.5)
        >>> wrapper.update_metadata(torch.tensor([1, -1, 1]))
        >>> qkv(torch.randn(3, 16)).shape
        torch.Size([3, 32])
    """

    def __init__(
        self,
        base: nn.Linear | torch.Tensor,
        wrapper: LoRABatchWrapper,
        *,
        max_rank: int,
        output_slices: Sequence[int] | None = None,
        bias: torch.Tensor | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            if bias is not None:
                raise ValueError("bias is taken from the nn.Linear; pass it only with a weight tensor")
            weight, bias = base.weight, base.bias
        elif isinstance(base, torch.Tensor) and base.dim() == 2:
            weight = base if isinstance(base, nn.Parameter) else nn.Parameter(base, requires_grad=False)
        else:
            raise TypeError(f"base must be an nn.Linear or a 2-D weight tensor, got {type(base).__name__}")
        out_features, in_features = weight.shape
        slices = (out_features,) if output_slices is None else tuple(output_slices)
        if sum(slices) != out_features:
            raise ValueError(f"output_slices {slices} must sum to out_features={out_features}")
        self.weight = weight
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self.wrapper = wrapper
        self.slots = LoRASlots(
            wrapper.max_loras,
            max_rank,
            in_features,
            slices,
            dtype=weight.dtype,
            device=weight.device,
            trainable=trainable,
        )

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def set_lora(
        self, slot: int, lora_a: MaybePerSlice, lora_b: MaybePerSlice, scaling: float | Sequence[float] = 1.0
    ) -> None:
        """See :meth:`LoRASlots.set_lora`."""
        self.slots.set_lora(slot, lora_a, lora_b, scaling)

    def reset_lora(self, slot: int) -> None:
        self.slots.reset_lora(slot)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.slots
        return self.wrapper.add_lora_linear(
            y, x, s.lora_a_stacked, s.lora_b_stacked, 1.0, s.output_slices, lora_ranks=s.lora_ranks
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        out = self._add_lora(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]))
        return out.view(y.shape)


class LoRALogits(LoRALinear):
    """An LM head with LoRA: :class:`LoRALinear` whose rows follow the wrapper's sampler mapping."""

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.slots
        return self.wrapper.add_lora_logits(
            y, x, s.lora_a_stacked[0], s.lora_b_stacked[0], 1.0, lora_ranks=s.lora_ranks
        )


class LoRAEmbedding(nn.Module):
    """``nn.Embedding`` plus each token's embedding-LoRA update (peft's ``lora_embedding_A/B``).

    The base table is shared with ``base`` and keeps its ``state_dict`` name (``weight``).
    Forward takes ``ids[...]`` int and returns ``[..., H]``.
    """

    def __init__(
        self, base: nn.Embedding, wrapper: LoRABatchWrapper, *, max_rank: int, trainable: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding) or base.max_norm is not None or base.sparse:
            raise TypeError(f"base must be an nn.Embedding without max_norm or sparse grads, got {base!r}")
        self.weight = base.weight
        self.padding_idx = base.padding_idx
        self.wrapper = wrapper
        self.slots = LoRAEmbeddingSlots(
            wrapper.max_loras,
            max_rank,
            base.num_embeddings,
            base.embedding_dim,
            dtype=base.weight.dtype,
            device=base.weight.device,
            trainable=trainable,
        )

    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float = 1.0) -> None:
        """``lora_a`` ``[r, V]``, ``lora_b`` ``[H, r]``; see :meth:`LoRASlots.set_lora`."""
        self.slots.set_lora(slot, lora_a, lora_b, scaling)

    def reset_lora(self, slot: int) -> None:
        self.slots.reset_lora(slot)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = nn.functional.embedding(ids, self.weight, self.padding_idx)
        s = self.slots
        out = self.wrapper.add_lora_embedding(
            y.reshape(-1, y.shape[-1]), ids.reshape(-1), s.lora_a_stacked[0], s.lora_b_stacked[0]
        )
        return out.view(y.shape)
