"""MambaCache: shapes per layer, slot allocation and reuse, padded batch indices, bad arguments."""

from __future__ import annotations

import types

import pytest
import torch

from pyiface.mamba_cache import MambaCache
from triton_kernels import PAD_SLOT_ID


def test_shapes_dtypes_and_layer_views():
    cache = MambaCache(3, 4, 24, 16, 4, conv_dtype=torch.float16)
    conv, ssm = cache.layer(2)
    assert conv.shape == (4, 24, 3)
    assert conv.dtype == torch.float16
    assert ssm.shape == (4, 24, 16)
    assert ssm.dtype == torch.float32
    conv.fill_(1.0)  # a view: writes land in the cache
    assert cache.conv_state[2].eq(1).all()
    assert cache.conv_state[:2].eq(0).all()


def test_heads_form():
    cache = MambaCache(1, 2, 64, 128, 4, num_heads=8)
    assert cache.ssm_state[0].shape == (2, 8, 8, 128)
    assert cache.conv_state[0].shape == (2, 64, 3)


def test_from_hf_style_config():
    cfg = types.SimpleNamespace(num_hidden_layers=2, intermediate_size=32, state_size=8, conv_kernel=3)
    cache = MambaCache.from_config(cfg, num_slots=5)
    assert cache.conv_state.shape == (2, 5, 32, 2)
    assert cache.ssm_state.shape == (2, 5, 32, 8)


def test_allocate_free_reuse_zeroes_the_slot():
    cache = MambaCache(2, 3, 4, 2, 2)
    a, b = cache.allocate("a"), cache.allocate("b")
    assert (a, b) == (0, 1)
    cache.ssm_state[:, a] = 7.0
    cache.conv_state[:, a] = 7.0
    cache.ssm_state[:, b] = 5.0
    cache.free("a")
    assert cache.num_free == 2
    c = cache.allocate("c")
    assert c == a  # the lowest free slot comes back, zeroed
    assert cache.ssm_state[:, c].eq(0).all()
    assert cache.conv_state[:, c].eq(0).all()
    assert cache.ssm_state[:, b].eq(5).all()  # other requests untouched
    assert cache.slot("b") == b


def test_batch_indices_with_padding():
    cache = MambaCache(1, 4, 4, 2, 4)
    cache.allocate("x")
    cache.allocate("y")
    idx = cache.batch_indices(["y", None, "x"], pad_to=5)
    assert idx.dtype == torch.int32
    assert idx.tolist() == [1, PAD_SLOT_ID, 0, PAD_SLOT_ID, PAD_SLOT_ID]


def test_full_cache_and_bad_requests():
    cache = MambaCache(1, 1, 4, 2, 2)
    cache.allocate("a")
    with pytest.raises(ValueError, match="already holds slot 0"):
        cache.allocate("a")
    with pytest.raises(RuntimeError, match="all 1 slots are in use"):
        cache.allocate("b")
    with pytest.raises(KeyError, match="holds no slot"):
        cache.free("b")
    with pytest.raises(ValueError, match="pad_to=0 is smaller than the batch"):
        cache.batch_indices(["a"], pad_to=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(conv_width=5), r"conv_width must be 2, 3 or 4, got 5"),
        (dict(num_slots=0), r"num_slots must be a positive int, got 0"),
        (dict(dim=10, num_heads=3), r"num_heads=3 must be a positive divisor of dim=10"),
    ],
)
def test_bad_sizes(kwargs, match):
    args = dict(num_layers=1, num_slots=2, dim=8, state_size=4, conv_width=4) | kwargs
    with pytest.raises(ValueError, match=match):
        MambaCache(**args)
