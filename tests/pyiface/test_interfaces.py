import warnings
from typing import ClassVar, Protocol

import pytest
import torch
from torch import nn

from pyiface.interfaces import (
    ISO639_1,
    HasInnerState,
    InterfaceWarning,
    IsAttentionFree,
    IsHybrid,
    QuantizationConfig,
    SupportsCrossEncoding,
    SupportsLoRA,
    SupportsMultiModal,
    SupportsPP,
    SupportsQuant,
    SupportsTranscription,
    SupportsV0Only,
    has_inner_state,
    is_attention_free,
    is_hybrid,
    supports_cross_encoding,
    supports_lora,
    supports_multimodal,
    supports_pp,
    supports_quant,
    supports_transcription,
    supports_v0_only,
)
from pyiface.intermediate_tensors import IntermediateTensors, make_empty_intermediate_tensors_factory
from tests.utils import assert_equal, backends
from triton_kernels import use_backend
from triton_kernels.registry import MULTIMODAL_SCATTER

# --------------------------------------------------------------------------------------------
# Flags and predicates on classes and instances


class _Base(nn.Module):
    """What a model that inherits each protocol must still define itself."""

    supported_languages: ClassVar = {"en": "English", "de": "German"}

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return input_ids


PROTOCOLS = [
    (SupportsMultiModal, supports_multimodal, "supports_multimodal"),
    (SupportsLoRA, supports_lora, "supports_lora"),
    (SupportsPP, supports_pp, "supports_pp"),
    (HasInnerState, has_inner_state, "has_inner_state"),
    (IsAttentionFree, is_attention_free, "is_attention_free"),
    (IsHybrid, is_hybrid, "is_hybrid"),
    (SupportsCrossEncoding, supports_cross_encoding, "supports_cross_encoding"),
    (SupportsQuant, supports_quant, "supports_quant"),
    (SupportsTranscription, supports_transcription, "supports_transcription"),
    (SupportsV0Only, supports_v0_only, "supports_v0_only"),
]
IDS = [flag for _, _, flag in PROTOCOLS]
ALL_PREDICATES = [pred for _, pred, _ in PROTOCOLS]


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """Any InterfaceWarning a test does not expect with pytest.warns fails it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterfaceWarning)
        yield


@pytest.mark.parametrize(("proto", "pred", "flag"), PROTOCOLS, ids=IDS)
def test_inherited_flag_on_class_and_instance(proto, pred, flag):
    model_cls = type("Model", (_Base, proto), {})
    assert getattr(proto, flag) is True
    assert pred(model_cls) is True
    assert pred(model_cls()) is True
    assert isinstance(model_cls(), proto)


@pytest.mark.parametrize(("proto", "pred", "flag"), PROTOCOLS, ids=IDS)
def test_subclass_of_subclass_and_opt_out(proto, pred, flag):
    child = type("Child", (type("Model", (_Base, proto), {}),), {})
    grandchild = type("GrandChild", (child,), {})
    assert pred(grandchild)
    assert pred(grandchild())
    opted_out = type("OptedOut", (grandchild,), {flag: False})
    assert not pred(opted_out)
    assert not pred(opted_out())


@pytest.mark.parametrize("pred", ALL_PREDICATES, ids=IDS)
def test_plain_model_has_no_flag(pred):
    assert pred(_Base) is False
    assert pred(_Base()) is False
    assert pred(object()) is False


def test_multiple_inheritance_sets_exactly_the_inherited_flags():
    class Jamba(_Base, IsHybrid, HasInnerState, SupportsLoRA, SupportsPP, SupportsQuant):
        pass

    class Mamba(nn.Module, HasInnerState, IsAttentionFree, SupportsV0Only):
        pass

    expected = {
        Jamba: {has_inner_state, is_hybrid, supports_lora, supports_pp, supports_quant},
        Mamba: {has_inner_state, is_attention_free, supports_v0_only},
    }
    for model_cls, flagged in expected.items():
        for pred in ALL_PREDICATES:
            assert pred(model_cls) == pred(model_cls()) == (pred in flagged), (model_cls, pred)


# Classes that set a flag by hand, without inheriting, with what the flag needs.
class _HandMultiModal:
    supports_multimodal = True

    def embed_multimodal(self, **kwargs):
        return []

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        return input_ids


class _HandLoRA:
    supports_lora = True
    packed_modules_mapping: ClassVar = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    embedding_modules: ClassVar = {"embed_tokens": "input_embeddings"}
    embedding_padding_modules: ClassVar = ["lm_head"]


class _HandPP:
    supports_pp = True
    make_empty_intermediate_tensors = staticmethod(make_empty_intermediate_tensors_factory(["h"], 4))

    def forward(self, input_ids, *, intermediate_tensors):
        return intermediate_tensors


class _HandHybrid:
    is_hybrid = True

    @classmethod
    def get_mamba_state_shape_from_config(cls, config):
        return (config["d"], config["w"] - 1), (config["d"], config["n"])


class _HandQuant:
    supports_quant = True
    packed_modules_mapping = None
    quant_config = None


class _HandTranscription:
    supports_transcription = True
    supported_languages: ClassVar = {"fr": "French"}

    @classmethod
    def get_generation_prompt(cls, *args):
        return "<|transcribe|>"


HAND_SET = [
    (_HandMultiModal, supports_multimodal),
    (_HandLoRA, supports_lora),
    (_HandPP, supports_pp),
    (type("_HandState", (), {"has_inner_state": True}), has_inner_state),
    (type("_HandNoAttention", (), {"is_attention_free": True}), is_attention_free),
    (_HandHybrid, is_hybrid),
    (type("_HandCross", (), {"supports_cross_encoding": True}), supports_cross_encoding),
    (_HandQuant, supports_quant),
    (_HandTranscription, supports_transcription),
    (type("_HandV0", (), {"supports_v0_only": True}), supports_v0_only),
]


@pytest.mark.parametrize(("model_cls", "pred"), HAND_SET, ids=IDS)
def test_hand_set_flag_counts(model_cls, pred):
    assert pred(model_cls) is True
    assert pred(model_cls()) is True
    assert sum(p(model_cls) for p in ALL_PREDICATES) == 1


def test_hand_set_hybrid_gives_state_shapes():
    assert _HandHybrid.get_mamba_state_shape_from_config({"d": 64, "w": 4, "n": 16}) == ((64, 3), (64, 16))
    with pytest.raises(NotImplementedError, match="get_mamba_state_shape_from_config"):
        type("Hybrid", (nn.Module, IsHybrid), {}).get_mamba_state_shape_from_config({})


# --------------------------------------------------------------------------------------------
# Warnings for flags without what they need


@pytest.mark.parametrize(
    "missing", ["packed_modules_mapping", "embedding_modules", "embedding_padding_modules"]
)
def test_lora_flag_without_module_maps_warns(missing):
    attrs = {k: v for k, v in vars(_HandLoRA).items() if not k.startswith("__") and k != missing}
    model_cls = type("HalfLoRA", (), attrs)
    for model in (model_cls, model_cls()):
        with pytest.warns(InterfaceWarning, match=rf"HalfLoRA.*supports_lora=True.*missing {missing}"):
            assert supports_lora(model) is False


def test_warnings_point_at_the_caller():
    model_cls = type("NoFactory", (), {"supports_pp": True, "forward": _HandPP.forward})
    with pytest.warns(InterfaceWarning) as missing_factory:
        supports_pp(model_cls)
    with pytest.warns(InterfaceWarning) as bad_forward:
        supports_pp(type("BadForward", (SupportsPP,), {"forward": lambda self: None}))
    with pytest.warns(InterfaceWarning) as missing_maps:
        supports_lora(type("HalfLoRA", (), {"supports_lora": True}))
    for record in (missing_factory, bad_forward, missing_maps):
        assert [w.filename for w in record] == [__file__]


def test_lora_maps_without_flag_warn():
    attrs = {k: v for k, v in vars(_HandLoRA).items() if not k.startswith("__") and k != "supports_lora"}
    with pytest.warns(InterfaceWarning, match="does not set `supports_lora=True`"):
        assert supports_lora(type("Unflagged", (), attrs)) is False


def test_pp_flag_without_factory_warns():
    model_cls = type("NoFactory", (), {"supports_pp": True, "forward": _HandPP.forward})
    with pytest.warns(InterfaceWarning, match="missing make_empty_intermediate_tensors"):
        assert supports_pp(model_cls) is False


@pytest.mark.parametrize(
    "forward",
    [
        pytest.param(lambda self, input_ids, positions: None, id="no-kwarg"),
        pytest.param(lambda self, *args: None, id="var-positional"),
        pytest.param(None, id="not-callable"),
    ],
)
def test_pp_forward_without_intermediate_tensors_warns(forward):
    model_cls = type("BadForward", (nn.Module, SupportsPP), {"forward": forward})
    for model in (model_cls, model_cls()):
        with pytest.warns(InterfaceWarning, match="forward.*does not accept `intermediate_tensors`"):
            assert supports_pp(model) is False


def test_pp_forward_inherited_from_module_warns():
    model_cls = type("NoForward", (nn.Module, SupportsPP), {})
    with pytest.warns(InterfaceWarning, match="intermediate_tensors"):
        assert supports_pp(model_cls) is False


@pytest.mark.parametrize(
    "forward",
    [
        pytest.param(lambda self, input_ids, positions, intermediate_tensors=None: None, id="positional"),
        pytest.param(lambda self, input_ids, *, intermediate_tensors: None, id="keyword-only"),
        pytest.param(lambda self, input_ids, **kwargs: None, id="var-keyword"),
    ],
)
def test_pp_forward_signatures_accepted(forward):
    model_cls = type("GoodForward", (nn.Module, SupportsPP), {"forward": forward})
    assert supports_pp(model_cls)
    assert supports_pp(model_cls())


def test_pp_factory_set_in_init_counts_on_the_instance():
    class Stage(nn.Module):
        supports_pp = True

        def __init__(self):
            super().__init__()
            self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(["h"], 8)

        def forward(self, input_ids, intermediate_tensors=None):
            return input_ids

    assert supports_pp(Stage()) is True
    with pytest.warns(InterfaceWarning, match="make_empty_intermediate_tensors"):
        assert supports_pp(Stage) is False
    empty = Stage().make_empty_intermediate_tensors(3, torch.float16, torch.device("cpu"))
    assert empty == IntermediateTensors({"h": torch.zeros(3, 8, dtype=torch.float16)})


@pytest.mark.parametrize(
    ("attrs", "pred", "missing"),
    [
        ({"supports_multimodal": True}, supports_multimodal, "get_multimodal_embeddings or embed_multimodal"),
        (
            {"supports_multimodal": True, "get_multimodal_embeddings": lambda self: []},
            supports_multimodal,
            "get_input_embeddings or embed_input_ids",
        ),
        ({"is_hybrid": True}, is_hybrid, "get_mamba_state_shape_from_config"),
        ({"supports_quant": True, "quant_config": None}, supports_quant, "packed_modules_mapping"),
        ({"supports_transcription": True}, supports_transcription, "supported_languages"),
    ],
    ids=["mm-embeddings", "mm-input-embeddings", "hybrid", "quant", "transcription"],
)
def test_other_flags_without_members_warn(attrs, pred, missing):
    model_cls = type("Incomplete", (), attrs)
    with pytest.warns(InterfaceWarning, match=f"missing {missing}"):
        assert pred(model_cls) is False


# --------------------------------------------------------------------------------------------
# Quantization config discovery


class _QuantConfig(QuantizationConfig):
    pass


class _VllmConfigLike:
    def __init__(self, quant_config):
        self.quant_config = quant_config


class _QuantModel(nn.Module, SupportsLoRA, SupportsQuant):
    packed_modules_mapping: ClassVar = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, hidden, config=None, *, quant_config=None, prefix=""):
        super().__init__()
        self.seen_in_init = self.quant_config
        self.proj = nn.Linear(hidden, hidden)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda c: _QuantModel(4, c), id="positional"),
        pytest.param(lambda c: _QuantModel(4, quant_config=c), id="keyword"),
        pytest.param(lambda c: _QuantModel(4, _VllmConfigLike(c)), id="nested-positional"),
        pytest.param(lambda c: _QuantModel(4, config=_VllmConfigLike(c)), id="nested-keyword"),
    ],
)
def test_quant_config_found_among_constructor_args(make):
    config = _QuantConfig()
    model = make(config)
    assert model.quant_config is config
    assert model.seen_in_init is config  # set before __init__ runs
    assert config.packed_modules_mapping == {"gate_up_proj": ["gate_proj", "up_proj"]}
    assert supports_quant(model)
    assert supports_lora(model)
    assert list(model.state_dict()) == ["proj.weight", "proj.bias"]


def test_quant_config_absent():
    model = _QuantModel(4, _VllmConfigLike(None), prefix="model")
    assert model.quant_config is None
    assert model.seen_in_init is None
    assert _QuantModel.quant_config is None
    assert supports_quant(model)


def test_quant_config_first_found_wins_and_registered_classes_count():
    class ForeignConfig:  # e.g. vLLM's own QuantizationConfig
        def __init__(self):
            self.packed_modules_mapping = {}

    QuantizationConfig.register(ForeignConfig)
    first, second = ForeignConfig(), _QuantConfig()
    model = _QuantModel(4, first, quant_config=second)
    assert model.quant_config is first
    assert first.packed_modules_mapping == _QuantModel.packed_modules_mapping
    assert second.packed_modules_mapping == {}


def test_quant_config_on_plain_class():
    class Plain(SupportsQuant):
        def __init__(self, quant_config):
            pass

    config = _QuantConfig()
    assert Plain(config).quant_config is config
    assert config.packed_modules_mapping == {}


# --------------------------------------------------------------------------------------------
# Transcription languages


def test_transcription_valid_codes_pass():
    class Whisper(nn.Module, SupportsTranscription):
        supported_languages: ClassVar = {"en": "English", "zh": "Chinese", "yo": "Yoruba"}

    assert supports_transcription(Whisper)
    assert supports_transcription(Whisper())
    assert Whisper.validate_language("zh") == "zh"
    assert Whisper.validate_language(None) is None
    assert "en" not in Whisper.get_other_languages()
    assert len(Whisper.get_other_languages()) == len(ISO639_1) - 3
    assert Whisper.get_num_audio_tokens(3.5, None, None) is None
    assert Whisper.supports_transcription_only is False
    with pytest.raises(NotImplementedError, match="get_generation_prompt"):
        Whisper.get_generation_prompt(None, None, None, "en", "transcribe", "", None)


def test_transcription_language_outside_the_model_warns_or_raises():
    class Asr(nn.Module, SupportsTranscription):
        supported_languages: ClassVar = {"en": "English"}

    with pytest.warns(InterfaceWarning, match="'de'"):
        assert Asr.validate_language("de") == "de"
    with pytest.raises(ValueError, match="'xx' is not an ISO 639-1 code"):
        Asr.validate_language("xx")


@pytest.mark.parametrize("bad", ["xx", "eng", "EN", "haw"])
def test_transcription_bad_code_raises_at_class_creation(bad):
    with pytest.raises(ValueError, match=rf"BadAsr\.supported_languages .* not ISO 639-1: \['{bad}'\]"):

        class BadAsr(nn.Module, SupportsTranscription):
            supported_languages: ClassVar = {"en": "English", bad: "Bad"}


def test_transcription_needs_a_language_mapping():
    with pytest.raises(TypeError, match="supported_languages"):

        class NoLanguages(SupportsTranscription):
            pass

    class SubProtocol(SupportsTranscription, Protocol):  # protocols are not checked
        pass

    class Concrete(SubProtocol):
        supported_languages: ClassVar = {"ja": "Japanese"}

    assert supports_transcription(Concrete)


def test_iso639_1_table():
    assert len(ISO639_1) == 183
    assert all(len(code) == 2 and code.islower() for code in ISO639_1)
    assert ISO639_1["en"] == "English"
    assert ISO639_1["gd"] == "Scottish Gaelic"


# --------------------------------------------------------------------------------------------
# Multimodal default embedding path

VOCAB, HIDDEN, PLACEHOLDER = 50, 16, 49


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)


class _TinyVLM(nn.Module, SupportsMultiModal):
    placeholder_token_id = PLACEHOLDER

    def __init__(self):
        super().__init__()
        self.language_model = _TinyLM()

    def get_language_model(self):
        return self.language_model

    def get_multimodal_embeddings(self, **kwargs):
        return [kwargs["image_embeds"]]


def _prompt(num_tokens: int, placeholder_at: list[int], placeholder: int = PLACEHOLDER) -> torch.Tensor:
    ids = torch.randint(0, VOCAB - 2, (num_tokens,))
    ids[placeholder_at] = placeholder
    return ids


def _reference(weight, ids, items, is_multimodal):
    """Plain torch: look up every token, then overwrite the placeholder rows in item order."""
    out = weight.detach()[ids.clamp(0, VOCAB - 1)].clone()
    if items is not None and len(items):
        out[is_multimodal] = torch.cat([t.reshape(-1, HIDDEN) for t in items])
    return out


BACKENDS = backends(MULTIMODAL_SCATTER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_tokens", "placeholder_at", "make_items"),
    [
        pytest.param(15, [], lambda: None, id="T15-none"),
        pytest.param(15, [3, 4], lambda: None, id="T15-placeholders-no-items"),
        pytest.param(15, [], lambda: [], id="T15-empty-list"),
        pytest.param(0, [], lambda: None, id="T0"),
        pytest.param(1, [0], lambda: [torch.randn(1, HIDDEN)], id="T1-one-row"),
        pytest.param(
            15, [2, 3, 4, 9, 10], lambda: [torch.randn(3, HIDDEN), torch.randn(2, HIDDEN)], id="T15-list"
        ),
        pytest.param(15, [0, 1, 2, 12, 13, 14], lambda: torch.randn(2, 3, HIDDEN), id="T15-3d"),
        pytest.param(5, list(range(5)), lambda: (torch.randn(5, HIDDEN),), id="T5-all-placeholders"),
    ],
)
def test_default_get_input_embeddings_matches_torch(backend, num_tokens, placeholder_at, make_items):
    model = _TinyVLM()
    weight = model.language_model.embed_tokens.weight
    table_before = weight.detach().clone()
    ids = _prompt(num_tokens, placeholder_at)
    items = make_items()
    mask = ids == PLACEHOLDER
    ref = _reference(weight, ids, items, mask)
    with use_backend(backend), torch.no_grad():
        assert_equal(model.get_input_embeddings(ids, items), ref, "get_input_embeddings")
        assert_equal(model.embed_input_ids(ids, items), ref, "embed_input_ids")
        assert_equal(model.embed_input_ids(ids, items, is_multimodal=mask), ref, "embed_input_ids(mask)")
    assert_equal(weight.detach(), table_before, "embedding table")


def test_default_get_input_embeddings_via_get_multimodal_embeddings():
    model = _TinyVLM()
    ids = _prompt(11, [4, 5, 6, 7])
    image = torch.randn(4, HIDDEN)
    with torch.no_grad():
        out = model.get_input_embeddings(ids, model.get_multimodal_embeddings(image_embeds=image))
    assert_equal(out, _reference(model.language_model.embed_tokens.weight, ids, [image], ids == PLACEHOLDER))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_path_with_mask_allows_out_of_vocab_placeholders(backend):
    model = _TinyVLM()
    model.placeholder_token_id = None
    ids = _prompt(9, [1, 2, 6], placeholder=100_000)
    mask = ids == 100_000
    items = [torch.randn(1, HIDDEN), torch.randn(2, HIDDEN)]
    with use_backend(backend), torch.no_grad():
        out = model.embed_input_ids(ids, items, is_multimodal=mask, handle_oov_mm_token=True)
    assert_equal(out, _reference(model.language_model.embed_tokens.weight, ids, items, mask))


def test_default_path_with_several_placeholder_ids_and_cast():
    model = _TinyVLM()
    model.placeholder_token_id = [48, 49]
    ids = _prompt(10, [1, 2], placeholder=48)
    ids[[7, 8]] = 49
    items = [torch.randn(2, HIDDEN, dtype=torch.float16), torch.randn(2, HIDDEN, dtype=torch.float16)]
    with torch.no_grad():
        out = model.get_input_embeddings(ids, items)
    mask = (ids == 48) | (ids == 49)
    ref = _reference(model.language_model.embed_tokens.weight, ids, [t.float() for t in items], mask)
    assert_equal(out, ref)


def test_default_path_errors():
    model = _TinyVLM()
    ids = _prompt(8, [3, 4])
    with torch.no_grad(), pytest.raises(ValueError, match="Attempted to assign 3 = 3 multimodal tokens to 2"):
        model.get_input_embeddings(ids, [torch.randn(3, HIDDEN)])
    model.placeholder_token_id = None
    with pytest.raises(ValueError, match="is_multimodal or set placeholder_token_id"):
        model.get_input_embeddings(ids, [torch.randn(2, HIDDEN)])


def test_embedding_table_lookup():
    class CausalLM(nn.Module):  # the *ForCausalLM.model.embed_tokens layout
        def __init__(self):
            super().__init__()
            self.model = _TinyLM()

    class Wrapped(_TinyVLM):
        def __init__(self):
            super().__init__()
            self.language_model = CausalLM()

    model = Wrapped()
    assert model.get_input_embedding_weight() is model.language_model.model.embed_tokens.weight

    class NoTable(_TinyVLM):
        def get_language_model(self):
            return nn.Linear(2, 2)

    with pytest.raises(TypeError, match="override get_input_embedding_weight"):
        NoTable().get_input_embeddings(torch.tensor([1, 2]))
    with pytest.raises(NotImplementedError, match="get_language_model"):
        type("NoLM", (nn.Module, SupportsMultiModal), {})().get_input_embedding_weight()


# --------------------------------------------------------------------------------------------
# Newer vLLM method names


def test_embed_multimodal_and_get_multimodal_embeddings_are_aliases():
    items = [torch.randn(2, HIDDEN)]

    class NewName(nn.Module, SupportsMultiModal):
        def embed_multimodal(self, **kwargs):
            return items

    class OldName(nn.Module, SupportsMultiModal):
        def get_multimodal_embeddings(self, **kwargs):
            return items

    for model in (NewName(), OldName()):
        assert model.get_multimodal_embeddings(pixel_values=None) is items
        assert model.embed_multimodal(pixel_values=None) is items
    with pytest.raises(NotImplementedError, match="get_multimodal_embeddings or embed_multimodal"):
        type("Neither", (nn.Module, SupportsMultiModal), {})().embed_multimodal()


def test_get_input_embeddings_forwards_to_embed_input_ids_with_a_mask():
    class NewStyle(_TinyVLM):
        def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
            self.mask = is_multimodal
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    model = NewStyle()
    ids = _prompt(12, [5, 6, 7])
    items = [torch.randn(3, HIDDEN)]
    with torch.no_grad():
        out = model.get_input_embeddings(ids, items)
    assert_equal(model.mask, ids == PLACEHOLDER, "is_multimodal")
    assert_equal(out, _reference(model.language_model.embed_tokens.weight, ids, items, model.mask))
    with torch.no_grad():
        model.get_input_embeddings(ids)
    assert model.mask is None


def test_embed_input_ids_forwards_to_get_input_embeddings():
    class OldStyle(_TinyVLM):
        def get_input_embeddings(self, input_ids, multimodal_embeddings=None):
            return super().get_input_embeddings(input_ids, multimodal_embeddings) * 2

    model = OldStyle()
    ids = _prompt(6, [0])
    items = [torch.randn(1, HIDDEN)]
    with torch.no_grad():
        out = model.embed_input_ids(ids, items, is_multimodal=ids == PLACEHOLDER)
    assert_equal(
        out, 2 * _reference(model.language_model.embed_tokens.weight, ids, items, ids == PLACEHOLDER)
    )


def test_hand_set_multimodal_with_either_name():
    class OldNames:
        supports_multimodal = True

        def get_multimodal_embeddings(self, **kwargs):
            return []

        def get_input_embeddings(self, input_ids, multimodal_embeddings=None):
            return input_ids

    assert supports_multimodal(OldNames)
    assert supports_multimodal(_HandMultiModal())
