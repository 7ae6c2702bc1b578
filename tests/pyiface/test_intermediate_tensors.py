import pytest
import torch

from pyiface.intermediate_tensors import (
    IntermediateTensors,
    PPMissingLayer,
    make_empty_intermediate_tensors_factory,
)
from tests.utils import assert_equal


def _tensors(tokens: int = 7, hidden: int = 5) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(tokens, hidden), "residual": torch.randn(tokens, hidden)}


def test_item_access_returns_the_tensor():
    tensors = _tensors()
    it = IntermediateTensors(tensors)
    assert it["hidden_states"] is tensors["hidden_states"]
    assert len(it) == 2
    assert dict(it.items()) == tensors
    with pytest.raises(KeyError):
        it["missing"]
    with pytest.raises(TypeError, match="names"):
        it[0]


@pytest.mark.parametrize("sl", [slice(2, 5), slice(None, 3), slice(4, None), slice(0, 7, 2), slice(3, 3)])
def test_slice_cuts_every_tensor_on_the_token_dim(sl):
    tensors = _tensors()
    part = IntermediateTensors(tensors)[sl]
    assert isinstance(part, IntermediateTensors)
    assert list(part.tensors) == ["hidden_states", "residual"]
    for name, t in tensors.items():
        assert_equal(part[name], t[sl], name)


def test_setitem_adds_and_replaces():
    it = IntermediateTensors(_tensors())
    new = torch.randn(7, 5)
    it["hidden_states"] = new
    it["aux"] = torch.randn(7, 3)
    assert it["hidden_states"] is new
    assert len(it) == 3


def test_equality_compares_names_and_values():
    tensors = _tensors()
    it = IntermediateTensors(tensors)
    assert it == IntermediateTensors({k: v.clone() for k, v in tensors.items()})
    changed = {k: v.clone() for k, v in tensors.items()}
    changed["residual"][3, 1] += 1.0
    assert it != IntermediateTensors(changed)
    assert it != IntermediateTensors({"hidden_states": tensors["hidden_states"]})
    assert it != IntermediateTensors(
        {"hidden_states": tensors["hidden_states"], "other": tensors["residual"]}
    )
    assert it != tensors
    with pytest.raises(TypeError):
        hash(it)


def test_repr_shows_names_shapes_dtypes():
    it = IntermediateTensors({"hidden_states": torch.randn(3, 4, dtype=torch.float16)})
    assert repr(it) == "IntermediateTensors(hidden_states=[3, 4] float16 cpu)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [1, 6, 0])
def test_factory_makes_zeros_per_key(dtype, batch_size):
    make = make_empty_intermediate_tensors_factory(["hidden_states", "residual"], 13)
    it = make(batch_size, dtype, torch.device("cpu"))
    assert list(it.tensors) == ["hidden_states", "residual"]
    for t in it.tensors.values():
        assert_equal(t, torch.zeros(batch_size, 13, dtype=dtype))
    assert it["hidden_states"] is not it["residual"]


def test_factory_accepts_any_iterable_of_keys_once():
    make = make_empty_intermediate_tensors_factory((k for k in ("a", "b")), 4)
    assert list(make(2, torch.float32, "cpu").tensors) == ["a", "b"]
    assert list(make(3, torch.float32, "cpu").tensors) == ["a", "b"]


def test_pp_missing_layer_passes_its_input_through():
    layer = PPMissingLayer(1024, bias=True, prefix="model.layers.3")
    assert list(layer.parameters()) == []
    assert list(layer.buffers()) == []
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    assert layer(x) is x
    assert layer(x, r, positions=torch.arange(4)) is x
    assert layer(hidden_states=x, residual=r) is x
    with pytest.raises(TypeError, match="input"):
        layer()
    assert layer.state_dict() == {}
