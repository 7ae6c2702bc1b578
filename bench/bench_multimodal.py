"""Multimodal placeholder scatter: the fused embed against vLLM's two-step paths.

Bytes by formula for the fused op: read every text row from the table and every multimodal row
from its item, write every output row, read the ids: ``2 * T * H * elem + T * id_bytes``.
"""

from __future__ import annotations

import torch

from bench.harness import Context, Row
from triton_kernels import embed_multimodal_tokens, use_backend
from triton_kernels.registry import MULTIMODAL_SCATTER

PLACEHOLDER = 151655  # Qwen2-VL's image pad id: inside a 152k vocabulary
VOCAB = 152064


def make_inputs(num_tokens, hidden, num_items, mm_fraction, dtype, device, weight=None):
    """Ids with ``num_items`` contiguous image spans covering ``mm_fraction`` of the tokens, items, and
    the embedding table (``weight`` when given)."""
    rows = int(num_tokens * mm_fraction) // num_items
    ids = torch.randint(0, PLACEHOLDER, (num_tokens,), device=device)
    stride = num_tokens // num_items
    for i in range(num_items):
        ids[i * stride : i * stride + rows] = PLACEHOLDER
    items = [torch.randn(rows, hidden, dtype=dtype, device=device) for _ in range(num_items)]
    if weight is None:
        weight = torch.randn(VOCAB, hidden, dtype=dtype, device=device)
    return ids, weight, items


def vllm_masked_scatter(ids, weight, items):
    """vLLM's path: embedding lookup of every id, then masked_scatter_ of the concatenated items."""
    embeds = torch.nn.functional.embedding(ids, weight)
    return embeds.masked_scatter_((ids == PLACEHOLDER).unsqueeze(-1), torch.cat(items))


def index_assignment(ids, weight, items):
    """The older vLLM path: lookup, then boolean index assignment (a host sync for the count)."""
    embeds = torch.nn.functional.embedding(ids, weight)
    embeds[ids == PLACEHOLDER] = torch.cat(items)
    return embeds


def cases(ctx: Context):
    if ctx.device.type == "cuda":
        yield 16384, 4096, 8, torch.bfloat16
        if not ctx.quick:
            yield 4096, 4096, 4, torch.bfloat16
            yield 16384, 3584, 32, torch.float16
    else:
        yield (2048, 1024, 8, torch.float32) if ctx.quick else (8192, 2048, 8, torch.float32)


def case_rows(ctx: Context, num_tokens: int, hidden: int, num_items: int, dtype: torch.dtype) -> list[Row]:
    table = torch.randn(VOCAB, hidden, dtype=dtype, device=ctx.device)  # one table, every set's ids index into it

    def make():
        ids, weight, items = make_inputs(num_tokens, hidden, num_items, 0.5, dtype, ctx.device, table)
        return ids, weight, items, torch.empty(num_tokens, hidden, dtype=dtype, device=ctx.device)

    sets = ctx.input_sets(make, shared=table)
    elem, id_bytes = sets[0][1].element_size(), sets[0][0].element_size()
    nbytes = 2 * num_tokens * hidden * elem + num_tokens * id_bytes
    case = f"T{num_tokens}-H{hidden}-{str(dtype)[6:]}-{num_items}items"
    rows = []
    for backend in ctx.our_backends(MULTIMODAL_SCATTER, [dtype]):
        def fused(inputs, backend=backend):
            ids, weight, items, out = inputs
            with use_backend(backend):
                embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, out=out)

        rows.append(ctx.row("multimodal", case, f"ours[{backend}] fused embed", fused, sets, nbytes))
    rows.append(ctx.row("multimodal", case, "vllm embed+masked_scatter",
                        lambda s: vllm_masked_scatter(*s[:3]), sets, nbytes))
    rows.append(ctx.row("multimodal", case, "embed+index assignment",
                        lambda s: index_assignment(*s[:3]), sets, nbytes))
    return rows


def run(ctx: Context) -> list[Row]:
    return [row for shape in cases(ctx) for row in case_rows(ctx, *shape)]
