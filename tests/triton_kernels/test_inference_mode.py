"""Every public op under ``torch.inference_mode()``, where HF's ``generate`` and vLLM run: inputs made
there are inference tensors (no version counter; written in place only inside inference mode). Each
case builds small random inputs from one seed, runs once outside and once inside inference mode on
the same backend, and must give the same results (outputs and the states written in place)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pyiface.lora import LoRABatchWrapper, LoRAEmbeddingSlots, LoRASlots
from tests.utils import KERNEL_DEVICE, assert_equal, backends
from triton_kernels import (
    LoRAKernelMeta,
    add_lora_linear,
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen,
    embed_multimodal_tokens,
    lora_expand,
    lora_linear,
    lora_shrink,
    mamba_chunk_scan_combined,
    mamba_chunk_scan_varlen,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    merge_multimodal_embeddings,
    merge_multimodal_embeddings_by_mask,
    rms_norm_gated,
    selective_scan_fn,
    selective_scan_varlen,
    selective_state_update,
    use_backend,
)
from triton_kernels.registry import OPS

# Each case runs under one forced backend and some call several ops: the backends every op has.
BACKENDS = backends(*OPS.values())


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=KERNEL_DEVICE)


def _ints(values: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=KERNEL_DEVICE)


# Each case returns every tensor it computed or wrote in place: [T, H] etc. as in the op's docstring.
def _merge() -> list[torch.Tensor]:
    emb = _randn(6, 8)
    out = merge_multimodal_embeddings(_ints([1, 9, 9, 2, 9, 3]), emb, [_randn(2, 8), _randn(1, 8)], 9)
    return [out, emb]


def _merge_by_mask() -> list[torch.Tensor]:
    emb = _randn(5, 8)
    mask = torch.tensor([False, True, True, False, True], device=KERNEL_DEVICE)
    return [merge_multimodal_embeddings_by_mask(emb, _randn(1, 3, 8), mask), emb]


def _embed() -> list[torch.Tensor]:
    return [embed_multimodal_tokens(_ints([3, 99, 99, 4]), _randn(10, 8), [_randn(2, 8)], placeholder_token_id=99)]


def _lora_meta(mapping: list[int], slots: int = 3) -> LoRAKernelMeta:
    meta = LoRAKernelMeta.make(slots, len(mapping) + 2, KERNEL_DEVICE)
    meta.prepare_tensors(_ints(mapping))
    return meta


MAPPING = [2, -1, 0, 2, 1, 0, -1]


def _lora_weights(widths=(6, 5), rank=4, hidden=16):
    return [_randn(3, rank, hidden) for _ in widths], [_randn(3, n, rank) for n in widths]


def _shrink_expand() -> list[torch.Tensor]:
    meta, (a, b) = _lora_meta(MAPPING), _lora_weights()
    shrunk, out = torch.zeros(2, 7, 4, device=KERNEL_DEVICE), _randn(7, 11)
    lora_shrink(_randn(7, 16), a, shrunk, *meta.meta_args(7), 0.5)
    lora_expand(shrunk, b, out, *meta.meta_args(7), offset_start=0, add_inputs=True)
    return [shrunk, out]


def _add_lora_linear() -> list[torch.Tensor]:
    meta, (a, b), y = _lora_meta(MAPPING), _lora_weights(), _randn(7, 11)
    ranks = _ints([4, 2, 1])
    add_lora_linear(y, _randn(7, 16), a, b, 0.5, (6, 5), meta, lora_ranks=ranks)
    return [y]


def _lora_linear() -> list[torch.Tensor]:
    meta, (a, b) = _lora_meta(MAPPING), _lora_weights()
    return [lora_linear(_randn(7, 16), a, b, 0.5, meta)]


def _wrapper() -> list[torch.Tensor]:
    """pyiface's batch wrapper: linear, logits and embedding updates with slots built in the mode."""
    wrapper = LoRABatchWrapper(3, 8, KERNEL_DEVICE, max_num_samples=3)
    wrapper.update_metadata(_ints(MAPPING), _ints([1, -1, 2]))
    slots = LoRASlots(3, 4, 16, (6, 5), device=KERNEL_DEVICE)
    embedding = LoRAEmbeddingSlots(3, 4, 10, 6, device=KERNEL_DEVICE)
    for slot, rank in ((0, 2), (2, 4)):
        slots.set_lora(slot, [_randn(rank, 16)] * 2, [_randn(6, rank), _randn(5, rank)], 0.5)
        embedding.set_lora(slot, _randn(rank, 10), _randn(6, rank))
    y, logits, emb = _randn(7, 11), _randn(3, 9), _randn(7, 6)
    wrapper.add_lora_linear(y, _randn(7, 16), slots.lora_a_stacked, slots.lora_b_stacked, 1.0, slots.output_slices,
                            lora_ranks=slots.lora_ranks)
    wrapper.add_lora_logits(logits, _randn(3, 16), _randn(3, 4, 16), _randn(3, 9, 4), 0.5)
    wrapper.add_lora_embedding(emb, _ints([1, 4, 9, 0, 2, 2, 7]), embedding.lora_a_stacked[0],
                               embedding.lora_b_stacked[0])
    return [y, logits, emb]


def _selective_scan() -> list[torch.Tensor]:
    u, delta, A, Bc = _randn(2, 8, 9), _randn(2, 8, 9).abs(), -torch.rand(8, 4, device=KERNEL_DEVICE), _randn(2, 4, 9)
    out, last = selective_scan_fn(u, delta, A, Bc, _randn(2, 4, 9), D=_randn(8), z=_randn(2, 8, 9),
                                  delta_bias=_randn(8), delta_softplus=True, return_last_state=True)
    return [out, last]


def _selective_scan_varlen() -> list[torch.Tensor]:
    states = _randn(4, 8, 4)
    out = selective_scan_varlen(
        _randn(8, 7), states, _randn(8, 7).abs(), -torch.rand(8, 4, device=KERNEL_DEVICE), _randn(1, 4, 7),
        _randn(1, 4, 7), D=_randn(8), delta_softplus=True, query_start_loc=_ints([0, 3, 7]),
        cache_indices=_ints([2, 0]), has_initial_state=torch.tensor([True, False], device=KERNEL_DEVICE),
    )
    return [out, states]


def _state_update() -> list[torch.Tensor]:
    state, x = _randn(4, 8, 4), _randn(2, 8)
    out = selective_state_update(state, x, x.abs(), -torch.rand(8, 4, device=KERNEL_DEVICE), _randn(2, 4),
                                 _randn(2, 4), D=_randn(8), z=_randn(2, 8), dt_softplus=True,
                                 state_batch_indices=_ints([3, 1]))
    return [out, state]


def _state_update_heads() -> list[torch.Tensor]:
    """The Mamba-2 decode step: heads, A a stride-0 expand of ``[H]``, grouped B and C."""
    state, x = _randn(3, 2, 4, 4), _randn(2, 2, 4)
    A = (-torch.rand(2, device=KERNEL_DEVICE))[:, None, None].expand(2, 4, 4)
    dt = _randn(2, 2)[:, :, None].expand(2, 2, 4)
    out = selective_state_update(state, x, dt, A, _randn(2, 1, 4), _randn(2, 1, 4), dt_softplus=True,
                                 state_batch_indices=_ints([2, 0]))
    return [out, state]


def _conv() -> list[torch.Tensor]:
    out, final = causal_conv1d_fn(_randn(2, 8, 5), _randn(8, 4), _randn(8), activation="silu",
                                  initial_states=_randn(2, 8, 3), return_final_states=True)
    return [out, final]


def _conv_varlen() -> list[torch.Tensor]:
    states = _randn(4, 8, 3)
    out = causal_conv1d_varlen(_randn(8, 7), _randn(8, 4), _randn(8), states, _ints([0, 2, 7]),
                               cache_indices=_ints([3, 0]),
                               has_initial_state=torch.tensor([True, False], device=KERNEL_DEVICE))
    return [out, states]


def _conv_update() -> list[torch.Tensor]:
    state = _randn(3, 8, 3)
    out = causal_conv1d_update(x=_randn(2, 8), conv_state=state, weight=_randn(8, 4), bias=_randn(8),
                               activation="silu", conv_state_indices=_ints([2, 0]))
    return [out, state]


def _mamba_inner() -> list[torch.Tensor]:
    D, N, R, W = 8, 4, 2, 4
    return [mamba_inner_fn(_randn(2, 2 * D, 6), _randn(D, 1, W), _randn(D), _randn(R + 2 * N, D), _randn(D, R),
                           _randn(5, D), None, -torch.rand(D, N, device=KERNEL_DEVICE), D=_randn(D),
                           delta_bias=_randn(D))]


def _ssd() -> list[torch.Tensor]:
    out, last = mamba_chunk_scan_combined(
        _randn(1, 10, 2, 4), _randn(1, 10, 2).abs(), -torch.rand(2, device=KERNEL_DEVICE), _randn(1, 10, 1, 4),
        _randn(1, 10, 1, 4), 8, D=_randn(2), z=_randn(1, 10, 2, 4), dt_bias=_randn(2), dt_softplus=True,
        initial_states=_randn(1, 2, 4, 4), return_final_states=True,
    )
    return [out, last]


def _ssd_varlen() -> list[torch.Tensor]:
    states = _randn(3, 2, 4, 4)
    out = mamba_chunk_scan_varlen(
        _randn(10, 2, 4), states, _randn(10, 2).abs(), -torch.rand(2, device=KERNEL_DEVICE), _randn(10, 1, 4),
        _randn(10, 1, 4), 8, D=_randn(2), dt_softplus=True, query_start_loc=_ints([0, 3, 10]),
        cache_indices=_ints([2, 0]), has_initial_state=torch.tensor([True, False], device=KERNEL_DEVICE),
    )
    return [out, states]


def _split_conv1d_scan() -> list[torch.Tensor]:
    h, p, g, n, W = 2, 4, 1, 4, 4
    dim, conv = h * p, h * p + 2 * g * n
    out = mamba_split_conv1d_scan_combined(
        _randn(1, 10, dim + conv + h), _randn(conv, W), _randn(conv), torch.rand(h, device=KERNEL_DEVICE),
        -torch.rand(h, device=KERNEL_DEVICE), _randn(h), 8, headdim=p, rmsnorm_weight=_randn(dim),
    )
    return [out]


def _rms_norm_gated() -> list[torch.Tensor]:
    return [rms_norm_gated(_randn(2, 5, 16), _randn(16), _randn(2, 5, 16), group_size=8, norm_before_gate=False)]


CASES: dict[str, Callable[[], list[torch.Tensor]]] = {
    "merge_multimodal_embeddings": _merge,
    "merge_multimodal_embeddings_by_mask": _merge_by_mask,
    "embed_multimodal_tokens": _embed,
    "lora_shrink+lora_expand": _shrink_expand,
    "add_lora_linear": _add_lora_linear,
    "lora_linear": _lora_linear,
    "LoRABatchWrapper": _wrapper,
    "selective_scan_fn": _selective_scan,
    "selective_scan_varlen": _selective_scan_varlen,
    "selective_state_update": _state_update,
    "selective_state_update-heads": _state_update_heads,
    "causal_conv1d_fn": _conv,
    "causal_conv1d_varlen": _conv_varlen,
    "causal_conv1d_update": _conv_update,
    "mamba_inner_fn": _mamba_inner,
    "mamba_chunk_scan_combined": _ssd,
    "mamba_chunk_scan_varlen": _ssd_varlen,
    "mamba_split_conv1d_scan_combined": _split_conv1d_scan,
    "rms_norm_gated": _rms_norm_gated,
}


def _run(case: Callable[[], list[torch.Tensor]], backend: str, inference: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    with use_backend(backend), torch.inference_mode(inference):
        return case()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_op_under_inference_mode_matches_outside(name, backend):
    case = CASES[name]
    expected = _run(case, backend, inference=False)
    got = _run(case, backend, inference=True)
    assert all(t.is_inference() for t in got), "the case must run on inference tensors"
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_equal(g.clone(), e.detach(), f"{name} result {i}")  # clone: a normal copy to compare
