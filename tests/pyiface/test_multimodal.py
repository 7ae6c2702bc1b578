"""MultiModalEmbedder: the building block a plan hands multimodal models."""

import pytest
import torch
import torch.nn as nn

from pyiface.multimodal import MultiModalEmbedder
from tests.utils import assert_equal


@pytest.fixture
def embedder():
    return MultiModalEmbedder(nn.Embedding(30, 12), placeholder_token_id=29)


def test_scatter_by_id_and_by_mask(embedder):
    ids = torch.tensor([1, 29, 29, 5, 29, 7])
    items = [torch.randn(2, 12), torch.randn(1, 12)]
    ref = embedder.embedding(ids).detach().clone()
    ref[ids == 29] = torch.cat(items)
    with torch.no_grad():
        assert_equal(embedder(ids, items), ref)
        assert_equal(embedder(ids, items, is_multimodal=ids == 29), ref)


def test_text_only_is_plain_embedding(embedder):
    ids = torch.tensor([3, 4, 29])
    with torch.no_grad():
        assert_equal(embedder(ids), embedder.embedding(ids))


def test_needs_an_embedding_module():
    with pytest.raises(TypeError, match=r"nn\.Embedding"):
        MultiModalEmbedder(nn.Linear(3, 3), 1)


def test_max_norm_is_refused():
    """nn.Embedding(max_norm=...) renormalises rows on lookup; the fused kernel would not."""
    with pytest.raises(TypeError, match="without max_norm"):
        MultiModalEmbedder(nn.Embedding(30, 12, max_norm=1.0), 29)


def test_every_position_a_placeholder_with_an_empty_table():
    embedder = MultiModalEmbedder(nn.Embedding(0, 4), placeholder_token_id=5)
    items = [torch.randn(3, 4)]
    with torch.no_grad():
        assert_equal(embedder(torch.tensor([5, 5, 5]), items), items[0])


def test_placeholder_that_wraps_is_refused():
    embedder = MultiModalEmbedder(nn.Embedding(30, 12), placeholder_token_id=2**32 + 2)
    ids = torch.tensor([1, 2, 3], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match="placeholder_token_id 4294967298 is outside"):
        embedder(ids, [torch.randn(1, 12)])
