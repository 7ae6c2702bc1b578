"""Pipeline stages: layer ranges and placeholder layers."""

import pytest
import torch.nn as nn

from pyiface.intermediate_tensors import PPMissingLayer
from pyiface.pipeline import make_layers, pp_layer_range


@pytest.mark.parametrize(
    ("num_layers", "pp_size", "expected"),
    [
        pytest.param(8, 2, [(0, 4), (4, 8)], id="even"),
        pytest.param(10, 4, [(0, 2), (2, 5), (5, 8), (8, 10)], id="remainder-before-last"),
        pytest.param(7, 1, [(0, 7)], id="single"),
        pytest.param(5, 5, [(i, i + 1) for i in range(5)], id="one-each"),
    ],
)
def test_ranges_cover_all_layers_once(num_layers, pp_size, expected):
    ranges = [pp_layer_range(num_layers, r, pp_size) for r in range(pp_size)]
    assert ranges == expected


@pytest.mark.parametrize(("rank", "size", "layers"), [(2, 2, 4), (-1, 2, 4), (0, 0, 4), (0, 5, 4)])
def test_bad_ranges_raise(rank, size, layers):
    with pytest.raises(ValueError, match=r"pp_rank|num_layers"):
        pp_layer_range(layers, rank, size)


def test_make_layers_places_missing_layers():
    start, end, layers = make_layers(6, lambda i: nn.Linear(3, 3), pp_rank=1, pp_size=3)
    assert (start, end) == (2, 4)
    assert [isinstance(m, nn.Linear) for m in layers] == [False, False, True, True, False, False]
    assert all(isinstance(layers[i], PPMissingLayer) for i in (0, 1, 4, 5))
