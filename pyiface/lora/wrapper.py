"""The LoRA batch wrapper: one per model, shared by its LoRA layers (vLLM's punica wrapper).

Once per step, :meth:`LoRABatchWrapper.update_metadata` takes each token's adapter slot (``-1``
= none) and fills fixed-size metadata buffers; then every LoRA layer adds its update through
:meth:`~LoRABatchWrapper.add_lora_linear` (or the embedding / logits variants), which read those
buffers. The buffers are allocated once, so a captured CUDA graph stays valid across steps with
different mappings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from triton_kernels.lora import LoRAKernelMeta, add_lora_linear, lora_expand, lora_linear


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class LoRABatchWrapper:
    """Per-step token -> adapter-slot metadata and the LoRA updates that read it.

    Args:
        max_loras: number of adapter slots ``L`` of every layer this wrapper serves.
        max_num_tokens: the most tokens one step may hold (the metadata buffers' size).
        device: where the metadata lives (the model's device).
        max_num_samples: the most rows :meth:`add_lora_logits` sees per step (default
            ``max_num_tokens``); logits rows have their own mapping (sampled tokens only).

    Example:
        >>> w = LoRABatchWrapper(max_loras=4, max_num_tokens=256, device="cpu")
        >>> w.update_metadata(torch.tensor([0, 0, -1, 3]))
        >>> w.num_tokens
        4
    """

    def __init__(
        self,
        max_loras: int,
        max_num_tokens: int,
        device: torch.device | str,
        *,
        max_num_samples: int | None = None,
    ) -> None:
        max_num_samples = max_num_tokens if max_num_samples is None else max_num_samples
        sizes = {"max_loras": max_loras, "max_num_tokens": max_num_tokens, "max_num_samples": max_num_samples}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_loras = max_loras
        self.max_num_tokens = max_num_tokens
        self.max_num_samples = max_num_samples
        self.device = torch.device(device)
        self.token_meta = LoRAKernelMeta.make(max_loras, max_num_tokens, self.device)
        self.sampler_meta = LoRAKernelMeta.make(max_loras, self.max_num_samples, self.device)
        self.num_tokens = 0
        self.num_samples = 0

    def update_metadata(
        self, token_lora_mapping: torch.Tensor, sampler_lora_mapping: torch.Tensor | None = None
    ) -> None:
        """Set this step's mapping: ``[T]`` int32/int64 slot per token (``-1`` = no LoRA).

        ``sampler_lora_mapping`` (``[T_s]``, default: the token mapping) gives the slot of each
        row that :meth:`add_lora_logits` will see. Both may live on the CPU or on the wrapper's
        device; they are copied into the same buffers every step. The slot range is checked
        with one host sync (:meth:`LoRAKernelMeta.prepare_tensors`, skipped during CUDA graph
        capture), once per mapping. On a bad mapping it raises and the wrapper maps no tokens
        until the next successful update, so a stale step cannot run by mistake.
        """
        self.num_tokens = self.num_samples = 0
        check_tensor("token_lora_mapping", token_lora_mapping, ndim=1, dtypes=INDEX_DTYPES)
        if sampler_lora_mapping is None and token_lora_mapping.shape[0] > self.max_num_samples:
            raise ValueError(
                f"token_lora_mapping has {token_lora_mapping.shape[0]} tokens, more than max_num_samples="
                f"{self.max_num_samples}: pass sampler_lora_mapping (the slots of the rows "
                "add_lora_logits sees) or make the wrapper with a larger max_num_samples"
            )
        self.token_meta.prepare_tensors(token_lora_mapping)
        samples = token_lora_mapping if sampler_lora_mapping is None else sampler_lora_mapping
        self.sampler_meta.prepare_tensors(samples)
        self.num_tokens = self.token_meta.num_tokens
        self.num_samples = self.sampler_meta.num_tokens

    def _check_rows(self, rows: int, mapped: int, what: str) -> None:
        if torch.compiler.is_compiling():  # a host check would pin a dynamic token count to one T
            return
        if rows != mapped:
            raise ValueError(
                f"the inputs have {rows} rows but the last successful update_metadata mapped {mapped} {what}"
            )

    def _apply(self, meta, mapped, y, x, lora_a, lora_b, scale, output_slices, lora_ranks) -> torch.Tensor:
        """Shared body of the linear and logits updates (arguments typed on the public methods)."""
        self._check_rows(x.shape[0], mapped, "tokens" if meta is self.token_meta else "sampled rows")
        if _needs_grad(y, x, *lora_a, *lora_b):
            return y + lora_linear(x, lora_a, lora_b, scale, meta, lora_ranks=lora_ranks)
        return add_lora_linear(y, x, lora_a, lora_b, scale, output_slices, meta, lora_ranks=lora_ranks)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: Sequence[torch.Tensor],
        lora_b_stacked: Sequence[torch.Tensor],
        scale: float,
        output_slices: Sequence[int],
        *,
        lora_ranks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``y[:, slice s] += scale * (x @ A_s[slot]^T) @ B_s[slot]^T`` per token's slot.

        Args:
            y: ``[T, sum n_s]``, updated in place (tokens with slot ``-1`` untouched).
            x: ``[T, H_in]``; ``T`` must equal the length of the last token mapping.
            lora_a_stacked / lora_b_stacked: per slice ``[L, R, H_in]`` / ``[L, n_s, R]``
                (:class:`~pyiface.lora.LoRASlots` holds them).
            scale: extra factor (``1.0`` with slots, which fold the adapter's scaling into B).
            output_slices: ``(n_0, ...)``.
            lora_ranks: ``[L]`` int each slot's rank, so low-rank slots cost less.

        Returns ``y``. When autograd records (grad mode on, an input requiring grad) ``y`` is
        left alone and ``y + delta`` is returned instead, differentiable in ``x``, ``y`` and
        the stacked weights - so always use the return value.
        """
        return self._apply(
            self.token_meta, self.num_tokens, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
            lora_ranks,
        )  # fmt: skip

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        lora_ranks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM-head LoRA: ``y[T_s, V] += scale * (x[T_s, H] @ A[slot]^T) @ B[slot]^T``.

        ``lora_a_stacked`` is ``[L, R, H]``, ``lora_b_stacked`` ``[L, V, R]``; rows follow the
        sampler mapping of :meth:`update_metadata`. Same return convention as
        :meth:`add_lora_linear`.
        """
        return self._apply(
            self.sampler_meta, self.num_samples, y, x, (lora_a_stacked,), (lora_b_stacked,), scale,
            (y.shape[-1],), lora_ranks,
        )  # fmt: skip

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x_ids: torch.Tensor,
        lora_a_embedding: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Embedding LoRA: ``y[t] += scale * A[slot_t][x_ids[t]] @ B[slot_t]^T``.

        Args:
            y: ``[T, H]`` base embeddings, updated in place (slot ``-1`` rows untouched).
            x_ids: ``[T]`` int token ids in ``[0, V)``.
            lora_a_embedding: ``[L, V, R]`` per-slot tables (A transposed, as
                :class:`~pyiface.lora.LoRAEmbeddingSlots` stores it).
            lora_b_stacked: ``[L, H, R]``.

        The A rows are gathered with one lookup (an id outside ``[0, V)`` raises like
        ``nn.Embedding``), then one expand adds them through B. Same return convention as
        :meth:`add_lora_linear`.
        """
        check_tensor("x_ids", x_ids, ndim=1, dtypes=INDEX_DTYPES, device=y.device)
        check_tensor("lora_a_embedding", lora_a_embedding, ndim=3, dtypes=FLOAT_DTYPES, device=y.device)
        num_tokens = self.num_tokens
        self._check_rows(x_ids.shape[0], num_tokens, "tokens")
        self._check_rows(y.shape[0], num_tokens, "tokens")
        num_loras, _, rank = lora_a_embedding.shape
        meta_args = self.token_meta.meta_args(num_tokens)
        slots = meta_args[0].clamp(0, num_loras - 1)  # slot -1 rows are gathered, then skipped
        rows = lora_a_embedding[slots, x_ids] * scale  # [T, R]
        if _needs_grad(y, rows, lora_b_stacked):
            # the differentiable linear path with an identity A: delta = rows @ B[slot]^T
            eye = torch.eye(rank, dtype=rows.dtype, device=rows.device).expand(num_loras, rank, rank)
            return y + lora_linear(rows, (eye,), (lora_b_stacked,), 1.0, self.token_meta)
        lora_expand(rows.float().unsqueeze(0), [lora_b_stacked], y, *meta_args, add_inputs=True)
        return y
