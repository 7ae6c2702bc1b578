"""Multi-LoRA benchmarks: the fused ``add_lora_linear`` against the paths a user would otherwise take.

Baselines: a peft-style loop over adapters (boolean-mask gather, two matmuls, scatter-add), a
gather + bmm over per-token weights in torch, and vLLM's two-kernel path (``lora_shrink`` into an
fp32 buffer, then ``lora_expand``) through our compatible ops. Shapes are Llama-3-8B's qkv
(4096 -> 4096 + 1024 + 1024) and o_proj (4096 -> 4096). Bytes are what the op must move: x once, y
read and written, and the weights of the adapters in use at their ranks.

GPU targets to check on a real device: fused >= 1.5x shrink+expand at T=64, 8 adapters, rank 16,
qkv; >= 70 % of the copy roof at prefill; mixed ranks (half 8, half 64) <= 60 % of rank 64.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.harness import Context, Row
from triton_kernels import LoRAKernelMeta, add_lora_linear, lora_expand, lora_shrink, use_backend
from triton_kernels.registry import ADD_LORA_LINEAR, LORA_SHRINK

QKV = (4096, 1024, 1024)
O_PROJ = (4096,)
HIDDEN = 4096
GATHER_BMM_MAX_BYTES = 2 << 30  # gather + bmm materialises per-token weights: skip it above 2 GiB


@dataclasses.dataclass
class Case:
    name: str
    tokens: int
    adapters: int
    ranks: tuple[int, ...]  # one per adapter; the slot capacity is their max
    widths: tuple[int, ...]
    hidden: int = HIDDEN
    per_slot_ranks: bool = False  # pass lora_ranks (otherwise every adapter runs at capacity)

    @property
    def label(self) -> str:
        ranks = "-".join(str(r) for r in sorted(set(self.ranks)))
        return f"{self.name}-T{self.tokens}-{self.adapters}ad-r{ranks}"


def _cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":  # the torch backend against the naive baselines, small shapes
        small = (1024, 256, 256)
        return [
            Case("qkv/4", 16, 8, (16,) * 8, small, hidden=1024),
            Case("qkv/4", 64, 8, (16,) * 8, small, hidden=1024),
            Case("o/4", 256, 1, (8,), (1024,), hidden=1024),
            Case("qkv/4-mixed", 64, 8, (8, 64) * 4, small, hidden=1024, per_slot_ranks=True),
        ]
    tokens = (1, 64) if quick else (1, 16, 64, 256)
    adapters = (1, 8) if quick else (1, 8, 64)
    ranks = (16,) if quick else (8, 16, 64)
    cases = [
        Case(name, t, n, (r,) * n, widths)
        for name, widths in (("qkv", QKV), ("o_proj", O_PROJ))
        for t in tokens
        for n in adapters
        for r in ranks
    ]
    cases += [Case(name, 8192, n, (16,) * n, widths) for name, widths in (("qkv", QKV), ("o_proj", O_PROJ))
              for n in (1, 8)]  # fmt: skip
    for t in (64, 8192):  # half the adapters at rank 8, half at 64, against all at 64
        cases.append(Case("qkv-mixed", t, 8, (8, 64) * 4, QKV, per_slot_ranks=True))
        cases.append(Case("qkv-mixed", t, 8, (64,) * 8, QKV))
    return cases


def _inputs(case: Case, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    cap = max(case.ranks)
    mapping = torch.randint(0, case.adapters, (case.tokens,), generator=gen, dtype=torch.int32)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(device, dtype)
    a = [
        (torch.randn(case.adapters, cap, case.hidden, generator=gen) * 0.02).to(device, dtype)
        for _ in case.widths
    ]
    b = [(torch.randn(case.adapters, n, cap, generator=gen) * 0.02).to(device, dtype) for n in case.widths]
    for slot, r in enumerate(case.ranks):  # rows past a slot's rank are zero, as a real padded slot
        for w in a:
            w[slot, r:] = 0
        for w in b:
            w[slot, :, r:] = 0
    meta = LoRAKernelMeta.make(case.adapters, case.tokens, device)
    meta.prepare_tensors(mapping)
    ranks = torch.tensor(case.ranks, dtype=torch.int32, device=device) if case.per_slot_ranks else None
    y = torch.zeros(case.tokens, sum(case.widths), device=device, dtype=dtype)
    return mapping.to(device), x, a, b, meta, ranks, y


def _peft_loop(y, x, a, b, mapping, scale):
    """peft's mixed-batch forward: for each adapter, gather its rows, two matmuls, add back."""
    for slot in range(a[0].shape[0]):
        rows = (mapping == slot).nonzero().flatten()
        if rows.numel():
            xs = x.index_select(0, rows)
            delta = torch.cat([(xs @ wa[slot].T) @ wb[slot].T for wa, wb in zip(a, b)], 1) * scale
            y.index_add_(0, rows, delta)


def _gather_bmm(y, x, a_cat, b_cat, mapping, scale):
    """Per-token weights gathered, then two batched matmuls (all slices stacked)."""
    shrunk = torch.bmm(a_cat.index_select(0, mapping), x.unsqueeze(2))  # [T, S*R, 1]
    y += torch.bmm(b_cat.index_select(0, mapping), shrunk).squeeze(2) * scale


def _shrink_expand(y, x, a, b, meta, scale, buf):
    args = meta.meta_args(x.shape[0])
    lora_shrink(x, a, buf, *args, scale)
    lora_expand(buf, b, y, *args, offset_start=0, add_inputs=True)


def _bytes_and_flops(case: Case, mapping: torch.Tensor, elem: int) -> tuple[float, float]:
    used = mapping.unique().tolist()
    rank_sum = sum(case.ranks[s] for s in used)
    n_total = sum(case.widths)
    weights = rank_sum * (len(case.widths) * case.hidden + n_total)
    bytes_moved = elem * (case.tokens * case.hidden + 2 * case.tokens * n_total + weights)
    flops = 2.0 * case.tokens * (len(case.widths) * case.hidden + n_total) * max(case.ranks)
    return bytes_moved, flops


def _case_rows(ctx: Context, case: Case, dtype: torch.dtype) -> list[Row]:
    device = ctx.device
    rank = max(case.ranks)
    two_kernel = device.type == "cuda" or case.tokens <= 64
    gathered = case.tokens * rank * (len(case.widths) * case.hidden + sum(case.widths))
    gather_bmm = gathered * torch.finfo(dtype).bits // 8 <= GATHER_BMM_MAX_BYTES

    def make() -> dict:
        mapping, x, a, b, meta, ranks, y = _inputs(case, device, dtype)
        inputs = dict(mapping=mapping, x=x, a=a, b=b, meta=meta, ranks=ranks, y=y)
        if two_kernel:
            inputs["buf"] = torch.zeros(len(case.widths), case.tokens, rank, device=device)
        if gather_bmm:
            blocks = torch.block_diag(*[torch.ones(n, rank) for n in case.widths]).to(device, dtype)
            inputs["a_cat"] = torch.cat(a, 1)  # [L, S*R, H]
            inputs["b_cat"] = torch.cat(b, 1).repeat(1, 1, len(case.widths)) * blocks  # [L, N, S*R], slice-diagonal
        return inputs

    sets = ctx.input_sets(make)
    first = sets[0]
    nbytes, flops = _bytes_and_flops(case, first["mapping"], first["x"].element_size())
    label = case.label + f"-{str(dtype).removeprefix('torch.')}" + ("-ranks" if case.per_slot_ranks else "")
    impls = {}
    for backend in ctx.our_backends(ADD_LORA_LINEAR, [dtype]):
        def fused(s, backend=backend):
            with use_backend(backend):
                add_lora_linear(s["y"], s["x"], s["a"], s["b"], 0.5, case.widths, s["meta"], lora_ranks=s["ranks"])

        impls[f"ours[{backend}] fused"] = fused
    if two_kernel:
        for backend in ctx.our_backends(LORA_SHRINK, [dtype]):
            def two_step(s, backend=backend):
                with use_backend(backend):
                    _shrink_expand(s["y"], s["x"], s["a"], s["b"], s["meta"], 0.5, s["buf"])

            impls[f"shrink+expand[{backend}]"] = two_step
    impls["peft loop"] = lambda s: _peft_loop(s["y"], s["x"], s["a"], s["b"], s["mapping"], 0.5)
    if gather_bmm:
        impls["gather+bmm"] = lambda s: _gather_bmm(s["y"], s["x"], s["a_cat"], s["b_cat"], s["mapping"], 0.5)
    return [ctx.row("lora", label, impl, fn, sets, nbytes, flops) for impl, fn in impls.items()]


def run(ctx: Context) -> list[Row]:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    return [row for case in _cases(ctx.device, ctx.quick) for row in _case_rows(ctx, case, dtype)]
