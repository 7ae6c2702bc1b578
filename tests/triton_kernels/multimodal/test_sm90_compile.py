"""The scatter kernel compiles for sm_90 in every variant it launches with, without spills."""

import textwrap

from tests.sm90 import needs_ptxas, run_sm90_script


@needs_ptxas
def test_scatter_kernel_compiles_for_sm90():
    run_sm90_script(textwrap.dedent("""
        from triton_kernels.multimodal.scatter import _embed_scatter_kernel as k
        ptrs = dict(out_ptr="*bf16", ids_ptr="*i64", weight_ptr="*bf16", mask_ptr="*i1", rank_ptr="*i32",
                    item_ptr="*bf16", table_ptr="*i64")
        ints = dict.fromkeys(["n_items", "total_rows", "hidden", "stride_out_t", "stride_w_v", "stride_item_r"], "i32")
        for gather in (True, False):
            for single in (True, False):
                meta = dict(GATHER_TEXT=gather, SINGLE_ITEM=single, BLOCK_H=4096)
                assert compile_sm90(k, {**ptrs, **ints}, meta, num_warps=8) == 0
    """))
