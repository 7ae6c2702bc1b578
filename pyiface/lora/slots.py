"""Adapter weight slots: the stacked LoRA weights of one layer, ``max_loras`` adapters at a time.

A layer with output slices ``(n_0, ..., n_{S-1})`` (one slice for a plain linear layer, three for
a packed qkv projection) holds, per slice ``s``, the kernels' layout (vLLM's, without its
singleton dim)::

    lora_a_stacked[s]  [L, R, H_in]   rows r >= rank of the slot's adapter are zero
    lora_b_stacked[s]  [L, n_s, R]    columns r >= rank are zero; holds scaling * B
    lora_ranks         [L] int32      each slot's rank (max over its slices), 0 when empty

``L = max_loras`` and ``R = max_rank``. The adapter's scaling (peft's ``lora_alpha / r``) is folded
into B once, when it is set, as vLLM does, so the kernels always run with ``scale=1.0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from triton_kernels._checks import FLOAT_DTYPES, check_tensor

MaybePerSlice = torch.Tensor | Sequence[torch.Tensor | None]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _per_slice(name: str, value: object, num_slices: int) -> list:
    """``value`` as one entry per slice: a lone tensor/float is accepted for one-slice layers."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_slices:
            raise ValueError(f"{name} must have one entry per output slice ({num_slices}), got {len(value)}")
        return list(value)
    if num_slices != 1:
        raise TypeError(
            f"{name} must be a list of {num_slices} entries (one per output slice of a packed layer), "
            f"got {type(value).__name__}"
        )
    return [value]


def _check_scaling(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked by :meth:`LoRASlots.prepare`, ready to :meth:`~LoRASlots.commit`."""

    slots: LoRASlots
    slot: int
    slices: list[tuple[torch.Tensor, torch.Tensor, float] | None]  # (A, B, scaling) per slice


class LoRASlots(nn.Module):
    """``max_loras`` LoRA adapters of one (possibly packed) linear layer, in the kernels' layout.

    Args:
        max_loras: number of slots ``L``; a token's slot id selects one, ``-1`` none.
        max_rank: the largest rank ``R`` an adapter may have; smaller ranks are zero-padded.
        in_features: ``H_in``.
        output_slices: widths ``n_s`` of the output slices, e.g. ``(4096, 1024, 1024)`` for a
            packed GQA qkv projection, ``(out_features,)`` for a plain layer.
        dtype, device: of the stacked weights (the model's dtype; adapters are cast on set).
        trainable: register the stacked weights as parameters (for training) instead of buffers.

    The stacked tensors are non-persistent (not in ``state_dict``), so a model's checkpoint
    keys do not change when LoRA layers are put in.

    Example:
        >>> slots = LoRASlots(4, 16, 64, (32,))
        >>> slots.set_lora(2, torch.randn(8, 64), torch.randn(32, 8), scaling=2.0)
        >>> slots.lora_ranks.tolist()
        [0, 0, 8, 0]
    """

    def __init__(
        self,
        max_loras: int,
        max_rank: int,
        in_features: int,
        output_slices: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.max_loras = _positive_int("max_loras", max_loras)
        self.max_rank = _positive_int("max_rank", max_rank)
        self.in_features = _positive_int("in_features", in_features)
        if not isinstance(output_slices, (list, tuple)) or not output_slices:
            raise ValueError(f"output_slices must be a non-empty list of widths, got {output_slices!r}")
        self.output_slices = tuple(_positive_int("output_slices[i]", n) for n in output_slices)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        # Normal tensors even under torch.inference_mode() (HF generate, vLLM): they stay writable by
        # set_lora anywhere, and their version counters let the ops read them once per change.
        with torch.inference_mode(False):
            for s, width in enumerate(self.output_slices):
                a = torch.zeros(max_loras, *self._a_shape(), dtype=dtype, device=device)
                b = torch.zeros(max_loras, width, max_rank, dtype=dtype, device=device)
                self._register(f"lora_a_{s}", a, trainable)
                self._register(f"lora_b_{s}", b, trainable)
            self.register_buffer("lora_ranks", torch.zeros(max_loras, dtype=torch.int32, device=device), False)

    def _a_shape(self) -> tuple[int, int]:
        return (self.max_rank, self.in_features)

    def _write_a(self, buf: torch.Tensor, a: torch.Tensor) -> None:
        buf[: a.shape[0]].copy_(a)

    def _register(self, name: str, t: torch.Tensor, trainable: bool) -> None:
        if trainable:
            self.register_parameter(name, nn.Parameter(t))
        else:
            self.register_buffer(name, t, persistent=False)

    @property
    def lora_a_stacked(self) -> tuple[torch.Tensor, ...]:
        """Per slice ``[L, R, H_in]``."""
        return tuple(getattr(self, f"lora_a_{s}") for s in range(len(self.output_slices)))

    @property
    def lora_b_stacked(self) -> tuple[torch.Tensor, ...]:
        """Per slice ``[L, n_s, R]`` (scaling folded in)."""
        return tuple(getattr(self, f"lora_b_{s}") for s in range(len(self.output_slices)))

    @property
    def device(self) -> torch.device:
        return self.lora_ranks.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_a_0.dtype

    def _check_slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_loras:
            raise ValueError(f"slot must be an int in [0, {self.max_loras}), got {slot!r}")
        return slot

    def _check_weight(self, name: str, t: object, shape: tuple[int | None, int | None]) -> torch.Tensor:
        check_tensor(name, t, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
        if t.device != self.device and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; adapters load from the CPU or from {self.device}")
        for dim, want in enumerate(shape):
            if want is not None and t.shape[dim] != want:
                raise ValueError(f"{name}.shape[{dim}] must be {want}, got shape {list(t.shape)}")
        return t

    def prepare(
        self,
        slot: int,
        lora_a: MaybePerSlice,
        lora_b: MaybePerSlice,
        scaling: float | Sequence[float] = 1.0,
    ) -> PreparedAdapter:
        """Validate an adapter for :meth:`commit` without writing (see :meth:`set_lora`)."""
        slot = self._check_slot(slot)
        num = len(self.output_slices)
        a_list = _per_slice("lora_a", lora_a, num)
        b_list = _per_slice("lora_b", lora_b, num)
        scales = [scaling] * num if isinstance(scaling, (int, float)) else _per_slice("scaling", scaling, num)
        checked: list[tuple[torch.Tensor, torch.Tensor, float] | None] = []
        for s, (a, b, scale) in enumerate(zip(a_list, b_list, scales)):
            sfx = f"[{s}]" if num > 1 else ""
            if (a is None) != (b is None):
                raise ValueError(f"lora_a{sfx} and lora_b{sfx} must both be given or both be None")
            if a is None:
                checked.append(None)
                continue
            a = self._check_weight(f"lora_a{sfx}", a, (None, self.in_features))
            rank = a.shape[0]
            if not 1 <= rank <= self.max_rank:
                raise ValueError(
                    f"lora_a{sfx} has rank {rank}, expected 1 <= rank <= max_rank={self.max_rank}"
                )
            b = self._check_weight(f"lora_b{sfx}", b, (self.output_slices[s], rank))
            checked.append((a, b, _check_scaling(f"scaling{sfx}", scale)))
        return PreparedAdapter(self, slot, checked)

    @torch.no_grad()
    def commit(self, prepared: PreparedAdapter) -> None:
        """Write an adapter validated by :meth:`prepare` of these slots."""
        if prepared.slots is not self:
            raise ValueError("this adapter was prepared for other slots")
        slot, rank = prepared.slot, 0
        for s, entry in enumerate(prepared.slices):
            a_buf, b_buf = self.lora_a_stacked[s][slot], self.lora_b_stacked[s][slot]
            a_buf.zero_()
            b_buf.zero_()
            if entry is None:
                continue
            a, b, scale = entry
            r = a.shape[0]
            self._write_a(a_buf, a)
            b_buf[:, :r].copy_(b.to(device=self.device, dtype=torch.float32) * scale)
            rank = max(rank, r)
        self.lora_ranks[slot] = rank

    def set_lora(
        self,
        slot: int,
        lora_a: MaybePerSlice,
        lora_b: MaybePerSlice,
        scaling: float | Sequence[float] = 1.0,
    ) -> None:
        """Load one adapter into ``slot`` (peft's layout), replacing what was there.

        Args:
            slot: ``0 <= slot < max_loras``.
            lora_a: ``[r, H_in]`` (peft ``lora_A.weight``), or per output slice a list of them;
                ``None`` for a slice the adapter leaves alone (e.g. no ``k_proj`` adapter).
            lora_b: ``[n_s, r]`` (peft ``lora_B.weight``), likewise; ranks may differ by slice.
            scaling: multiplies the update (peft's ``lora_alpha / r``), one per slice or shared;
                folded into the stored B in float32 before the cast to the slots' dtype.

        Weights may come from the CPU or the slots' device, in any float dtype. Raises
        ``ValueError``/``TypeError`` naming the bad argument, leaving every slot unchanged.
        """
        self.commit(self.prepare(slot, lora_a, lora_b, scaling))

    @torch.no_grad()
    def reset_lora(self, slot: int) -> None:
        """Empty ``slot``: zero weights and rank 0, so tokens mapped to it get no update."""
        slot = self._check_slot(slot)
        for a, b in zip(self.lora_a_stacked, self.lora_b_stacked):
            a[slot].zero_()
            b[slot].zero_()
        self.lora_ranks[slot] = 0

    def extra_repr(self) -> str:
        return (
            f"max_loras={self.max_loras}, max_rank={self.max_rank}, in_features={self.in_features}, "
            f"output_slices={self.output_slices}, dtype={self.dtype}"
        )


class LoRAEmbeddingSlots(LoRASlots):
    """Slots of an embedding layer: A is a per-slot table, so a token's row is a lookup.

    Layout: ``lora_a_stacked[0]`` is ``[L, V, R]`` (A transposed, ``V = num_embeddings =
    in_features``), ``lora_b_stacked[0]`` is ``[L, H, R]``; :meth:`set_lora` takes peft's
    ``lora_embedding_A`` ``[r, V]`` and ``lora_embedding_B`` ``[H, r]``.
    """

    def __init__(
        self, max_loras: int, max_rank: int, num_embeddings: int, embedding_dim: int, **kwargs
    ) -> None:
        super().__init__(max_loras, max_rank, num_embeddings, (embedding_dim,), **kwargs)

    def _a_shape(self) -> tuple[int, int]:
        return (self.in_features, self.max_rank)

    def _write_a(self, buf: torch.Tensor, a: torch.Tensor) -> None:
        buf[:, : a.shape[0]].copy_(a.T)
