"""Per-step metadata of the multi-LoRA kernels: which tokens each adapter slot owns.

Tokens are never moved. A stable sort of the token -> slot mapping groups token indices by slot;
the kernels give each slot its own programs and read that slot's segment of the sorted indices.
All tensors have a fixed size (set by :meth:`LoRAKernelMeta.make`), so a step that reads them can
be captured in a CUDA graph and replayed after :meth:`LoRAKernelMeta.prepare_tensors` refills them.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_kernels._checks import INDEX_DTYPES, check_tensor
from triton_kernels._data_checks import capturing


@dataclasses.dataclass
class LoRAKernelMeta:
    """vLLM's ``LoRAKernelMeta``: the argument tuple of :func:`lora_shrink` / :func:`lora_expand`.

    Fields (``L`` = ``max_loras``, ``M`` = ``max_num_tokens``, all int32 on the device):
        token_lora_mapping: ``[M]``, the slot of each token (``-1`` = no LoRA), first ``T`` valid.
        token_indices_sorted_by_lora_ids: ``[M]``, token indices stably sorted by slot.
        active_lora_ids: ``[L + 1]``, always ``[-1, 0, 1, ..., L - 1]``: every slot has a group,
            so no count of distinct ids is needed (vLLM lists the distinct ids, padded with -1;
            both read the same to a kernel, since a group with no tokens launches no work).
        num_tokens_per_lora: ``[L + 1]``, tokens of each group of ``active_lora_ids``.
        lora_token_start_loc: ``[L + 2]``, exclusive prefix sum of ``num_tokens_per_lora``.
        no_lora_flag_cpu: ``[1]`` bool on the CPU, True when no token of the batch uses a LoRA;
            the ops then return without launching.
        num_tokens: ``T`` of the last :meth:`prepare_tensors`.

    The buffers are normal tensors even when made under ``torch.inference_mode()`` (where vLLM and
    HF's ``generate`` run): their version counters then record every refill, so the ops read the
    metadata values back once per prepared step, not once per call (see
    :func:`triton_kernels._data_checks.check_once`).
    """

    token_lora_mapping: torch.Tensor
    token_indices_sorted_by_lora_ids: torch.Tensor
    active_lora_ids: torch.Tensor
    num_tokens_per_lora: torch.Tensor
    lora_token_start_loc: torch.Tensor
    no_lora_flag_cpu: torch.Tensor
    num_tokens: int = 0

    @staticmethod
    def make(max_loras: int, max_num_tokens: int, device: torch.device | str) -> LoRAKernelMeta:
        """Allocate the buffers for up to ``max_loras`` slots and ``max_num_tokens`` tokens."""
        if max_loras < 1 or max_num_tokens < 0:
            raise ValueError(
                f"max_loras must be >= 1 and max_num_tokens >= 0, got {max_loras}, {max_num_tokens}"
            )
        i32 = {"dtype": torch.int32, "device": device}
        with torch.inference_mode(False):  # normal tensors: version counters, writable anywhere
            return LoRAKernelMeta(
                token_lora_mapping=torch.full((max_num_tokens,), -1, **i32),
                token_indices_sorted_by_lora_ids=torch.zeros(max_num_tokens, **i32),
                active_lora_ids=torch.arange(-1, max_loras, **i32),
                num_tokens_per_lora=torch.zeros(max_loras + 1, **i32),
                lora_token_start_loc=torch.zeros(max_loras + 2, **i32),
                no_lora_flag_cpu=torch.tensor([True]),
            )

    @property
    def max_loras(self) -> int:
        return self.active_lora_ids.shape[0] - 1

    @property
    def max_num_tokens(self) -> int:
        return self.token_lora_mapping.shape[0]

    def prepare_tensors(self, token_lora_mapping: torch.Tensor) -> None:
        """Refill the buffers for a batch whose token ``t`` uses slot ``token_lora_mapping[t]``.

        Args:
            token_lora_mapping: ``[T]`` int32/int64, values in ``[-1, max_loras)``, on the CPU or
                on the meta's device.

        This is the per-step host-side point, and the one place that syncs: when the mapping
        lives on the GPU, its min and max are read back once (vLLM syncs here too, for its
        no-LoRA flag and ``torch.unique``) to check the slot range and set ``no_lora_flag_cpu``.
        A CPU mapping costs no device sync. While a CUDA graph is being captured the check is
        skipped and the flag stays False (the kernels then launch and skip slot -1 themselves).
        The buffers are refilled even for an all -1 batch, so a captured graph replays correctly.
        Raises ValueError, leaving the buffers unchanged, on a bad length or slot id.
        """
        mapping = check_tensor("token_lora_mapping", token_lora_mapping, ndim=1, dtypes=INDEX_DTYPES)
        num_tokens = mapping.shape[0]
        if num_tokens > self.max_num_tokens:
            raise ValueError(
                f"token_lora_mapping has {num_tokens} tokens, more than max_num_tokens={self.max_num_tokens}"
            )
        device = self.token_lora_mapping.device
        no_lora = num_tokens == 0
        if num_tokens and not capturing(self.token_lora_mapping):
            lo, hi = torch.stack(list(mapping.aminmax())).tolist()
            if lo < -1 or hi >= self.max_loras:
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"token_lora_mapping holds slot id {bad}, outside [-1, {self.max_loras}) "
                    f"(max_loras={self.max_loras}; -1 means no LoRA)"
                )
            no_lora = hi == -1
        mapping = mapping.to(device=device, dtype=torch.int32, non_blocking=True)
        self.token_lora_mapping[:num_tokens].copy_(mapping)
        order = torch.sort(mapping, stable=True).indices
        self.token_indices_sorted_by_lora_ids[:num_tokens].copy_(order)
        counts = torch.zeros(self.max_loras + 1, dtype=torch.int32, device=device)
        counts.index_add_(0, (mapping + 1).long(), torch.ones_like(mapping))
        self.num_tokens_per_lora.copy_(counts)
        self.lora_token_start_loc[1:].copy_(counts.cumsum(0))
        self.no_lora_flag_cpu.fill_(no_lora)
        self.num_tokens = num_tokens

    def meta_args(self, num_tokens: int, specialize_active_lora: bool = False) -> tuple[torch.Tensor | int, ...]:
        """The seven metadata arguments of :func:`lora_shrink` / :func:`lora_expand` (vLLM >= 0.32's
        order), to unpack between the output tensor and ``scaling`` / ``offset_start``:
        ``(token_lora_mapping[:T], token_indices_sorted_by_lora_ids[:T], num_tokens_per_lora,
        lora_token_start_loc, active_lora_ids, no_lora_flag_cpu, num_active_loras)``.

        ``num_active_loras`` is an ``int``, the number of groups of ``active_lora_ids`` the kernels
        launch over: always ``max_loras + 1`` here, every slot and slot -1 having a group, so a
        launch never depends on the batch (vLLM's value without ``specialize_active_lora``).
        ``specialize_active_lora`` is accepted for vLLM's call ``meta_args(T, specialize)`` and
        changes nothing. The ops also take the first six alone (vLLM < 0.32's form).
        """
        return (
            self.token_lora_mapping[:num_tokens],
            self.token_indices_sorted_by_lora_ids[:num_tokens],
            self.num_tokens_per_lora,
            self.lora_token_start_loc,
            self.active_lora_ids,
            self.no_lora_flag_cpu,
            self.max_loras + 1,
        )
