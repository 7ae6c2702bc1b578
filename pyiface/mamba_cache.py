"""The Mamba state cache a plan hands to models with inner state (``HasInnerState``).

Per layer it holds the conv state ``[slots, D, W-1]`` (the last W-1 inputs of the causal conv)
and the SSM state ``[slots, D, N]`` (or ``[slots, H, P, N]`` for mamba2-style heads), and it
gives each running request a slot. Batches address the cache through ``[B]`` slot-index tensors
(``batch_indices``), where a padded entry is ``PAD_SLOT_ID``: the kernels neither read nor write
its state. This is the layout ``causal_conv1d_varlen`` / ``causal_conv1d_update`` /
``selective_state_update`` / ``selective_scan_varlen`` take.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from triton_kernels import PAD_SLOT_ID


class MambaCache:
    """Conv and SSM states of ``num_layers`` Mamba layers for ``num_slots`` concurrent requests.

    Args:
        num_layers, num_slots: cache extent.
        dim: D, the channels of the conv and the SSM (``intermediate_size``; for heads, ``H * P``).
        state_size: N. conv_width: W (2..4).
        num_heads: H for the heads form of the SSM state (D must be a multiple of it), else None.
        conv_dtype / ssm_dtype: state dtypes (the SSM state is usually fp32 even for bf16 models).

    ``conv_state[layer]`` is ``[slots, D, W-1]``, ``ssm_state[layer]`` is ``[slots, D, N]`` or
    ``[slots, H, D/H, N]``; both are views of one tensor each, so a CUDA graph sees fixed buffers.

    Example:
        >>> cache = MambaCache(num_layers=2, num_slots=4, dim=8, state_size=16, conv_width=4)
        >>> slot = cache.allocate("req-a"); cache.conv_state[0].shape, cache.ssm_state[1].shape
        (torch.Size([4, 8, 3]), torch.Size([4, 8, 16]))
        >>> cache.batch_indices(["req-a", None]).tolist()
        [0, -1]
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        dim: int,
        state_size: int,
        conv_width: int,
        *,
        num_heads: int | None = None,
        conv_dtype: torch.dtype = torch.float32,
        ssm_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_slots", num_slots), ("dim", dim),
                            ("state_size", state_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if conv_width not in (2, 3, 4):
            raise ValueError(f"conv_width must be 2, 3 or 4, got {conv_width!r}")
        if num_heads is not None and (num_heads < 1 or dim % num_heads):
            raise ValueError(f"num_heads={num_heads!r} must be a positive divisor of dim={dim}")
        ssm_row = (dim, state_size) if num_heads is None else (num_heads, dim // num_heads, state_size)
        self.num_slots = num_slots
        self.conv_state = torch.zeros(num_layers, num_slots, dim, conv_width - 1, dtype=conv_dtype,
                                      device=device)
        self.ssm_state = torch.zeros(num_layers, num_slots, *ssm_row, dtype=ssm_dtype, device=device)
        self._slot_of: dict[Hashable, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first

    @classmethod
    def from_config(cls, config: object, num_slots: int, **kwargs) -> MambaCache:
        """Sizes from an HF-style Mamba config (``num_hidden_layers``, ``intermediate_size``,
        ``state_size``, ``conv_kernel``)."""
        return cls(config.num_hidden_layers, num_slots, config.intermediate_size, config.state_size,
                   config.conv_kernel, **kwargs)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv_state, ssm_state)`` of one layer (views)."""
        return self.conv_state[index], self.ssm_state[index]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, request: Hashable) -> int:
        """Give ``request`` a slot with zeroed states; raise when it has one or the cache is full."""
        if request in self._slot_of:
            raise ValueError(f"request {request!r} already holds slot {self._slot_of[request]}")
        if not self._free:
            raise RuntimeError(f"the Mamba cache is full: all {self.num_slots} slots are in use")
        slot = self._free.pop()
        self.conv_state[:, slot].zero_()
        self.ssm_state[:, slot].zero_()
        self._slot_of[request] = slot
        return slot

    def free(self, request: Hashable) -> None:
        """Return the slot of a finished request to the pool."""
        if request not in self._slot_of:
            raise KeyError(f"request {request!r} holds no slot")
        self._free.append(self._slot_of.pop(request))

    def slot(self, request: Hashable) -> int:
        return self._slot_of[request]

    def batch_indices(self, requests: Sequence[Hashable | None], pad_to: int | None = None) -> torch.Tensor:
        """``[B]`` int32 slot indices on the cache's device: ``None`` entries, and the tail up to
        ``pad_to`` (a CUDA-graph batch size), are ``PAD_SLOT_ID``."""
        slots = [PAD_SLOT_ID if r is None else self._slot_of[r] for r in requests]
        if pad_to is not None:
            if pad_to < len(slots):
                raise ValueError(f"pad_to={pad_to} is smaller than the batch ({len(slots)})")
            slots += [PAD_SLOT_ID] * (pad_to - len(slots))
        return torch.tensor(slots, dtype=torch.int32, device=self.conv_state.device)
