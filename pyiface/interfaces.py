"""The optional interfaces a model declares, and the predicates that read them (vLLM's
``vllm/model_executor/models/interfaces.py``).

A model says what it can do by inheriting a protocol, which sets a ``ClassVar[Literal[True]]``
flag, or by setting the flag itself. Predicates read the flag with ``getattr(model, flag, False)``,
so a class and its instances answer alike and a subclass may opt out with ``flag = False``.
Where a flag needs members (LoRA: module maps; PP: ``make_empty_intermediate_tensors`` and a
``forward`` taking ``intermediate_tensors``; ...), a model that sets the flag without them gets
an :class:`InterfaceWarning` and the predicate answers ``False``, as vLLM does for LoRA and PP.

Multimodal default embedding path: ``get_input_embeddings`` / ``embed_input_ids`` gather text
rows from :meth:`SupportsMultiModal.get_input_embedding_weight` (default: the ``embed_tokens``
module of ``get_language_model()``, or of its ``.model``) and write the multimodal rows at the
placeholder positions, in one fused launch (:func:`triton_kernels.embed_multimodal_tokens`).
The positions come from the ``is_multimodal`` mask when given, else from the model's
``placeholder_token_id`` attribute (an id or a list of ids).
"""

from __future__ import annotations

import abc
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Protocol, TypeAlias, overload, runtime_checkable

import torch
from torch import Tensor
from typing_extensions import Self

from pyiface.intermediate_tensors import IntermediateTensors
from pyiface.multimodal import embed_with_placeholders
from triton_kernels.multimodal import placeholder_mask

MultiModalEmbeddings: TypeAlias = list[Tensor] | Tensor | tuple[Tensor, ...]
"""A list/tuple of 2-D ``[rows_i, H]`` tensors, one per item (image, audio clip) in prompt order,
or one 3-D ``[n, rows, H]`` tensor grouping them."""


class InterfaceWarning(UserWarning):
    """A model sets an interface flag but lacks what the flag needs (or the reverse)."""


# --------------------------------------------------------------------------------------------
# Multimodal


@runtime_checkable
class SupportsMultiModal(Protocol):
    """Models that take images, audio or video: their embeddings go into placeholder positions.

    Define ``get_multimodal_embeddings`` (or its newer vLLM name ``embed_multimodal``) and either
    rely on the default ``get_input_embeddings`` / ``embed_input_ids`` (fused gather + scatter,
    needs ``get_language_model()`` and ``placeholder_token_id``) or override one of the two
    names; each default forwards to the other name when the model overrides that one. Override
    a name with your own code, not by calling the other name's default.
    """

    supports_multimodal: ClassVar[Literal[True]] = True

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        """The prompt text standing for the ``i``-th item of ``modality`` (e.g. ``"<image>"``)."""
        raise NotImplementedError(f"{cls.__name__} does not define get_placeholder_str")

    def get_multimodal_embeddings(self, **kwargs: object) -> MultiModalEmbeddings:
        """Embeddings of the multimodal inputs in ``kwargs``, in prompt order."""
        if _overrides(self, "embed_multimodal"):
            return self.embed_multimodal(**kwargs)
        raise NotImplementedError(
            f"{type(self).__name__} must define get_multimodal_embeddings or embed_multimodal"
        )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Newer vLLM name of :meth:`get_multimodal_embeddings`."""
        if _overrides(self, "get_multimodal_embeddings"):
            return self.get_multimodal_embeddings(**kwargs)
        raise NotImplementedError(
            f"{type(self).__name__} must define get_multimodal_embeddings or embed_multimodal"
        )

    def get_language_model(self) -> torch.nn.Module:
        """The text model that consumes the merged embeddings."""
        raise NotImplementedError(f"{type(self).__name__} does not define get_language_model")

    def get_input_embedding_weight(self) -> Tensor:
        """The ``[V, H]`` text embedding table of the default embedding path.

        Default: ``embed_tokens.weight`` of ``get_language_model()``, or of its ``.model``
        (the HF/vLLM ``*ForCausalLM.model.embed_tokens`` layout). Override when the table lives
        elsewhere; override the embedding methods instead when text rows are not plain table
        rows (e.g. scaled, or a vocabulary split across ranks).
        """
        lm = self.get_language_model()
        for owner in (lm, getattr(lm, "model", None)):
            table = getattr(owner, "embed_tokens", None)
            if isinstance(getattr(table, "weight", None), Tensor):
                return table.weight
        raise TypeError(
            f"{type(self).__name__}: get_language_model() has no embed_tokens module; override "
            "get_input_embedding_weight() to name the embedding table"
        )

    @overload  # vLLM V0: placeholders found by token id, attention metadata passed along
    def get_input_embeddings(
        self,
        input_ids: Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        attn_metadata: object | None = None,
    ) -> Tensor: ...

    @overload  # vLLM V1: placeholders given as a mask
    def get_input_embeddings(
        self,
        input_ids: Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: Tensor | None = None,
    ) -> Tensor: ...

    def get_input_embeddings(
        self,
        input_ids: Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        attn_metadata: object | None = None,
        *,
        is_multimodal: Tensor | None = None,
    ) -> Tensor:
        """``[T, H]`` embeddings of ``input_ids`` ``[T]`` with the multimodal rows at the placeholders.

        ``attn_metadata`` is accepted for vLLM V0 callers and unused. Without multimodal
        embeddings (``None`` or empty) this is a plain table lookup.
        """
        if _overrides(self, "embed_input_ids"):
            if is_multimodal is None and _has_items(multimodal_embeddings):
                is_multimodal = _placeholder_mask(self, input_ids)
            return self.embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        return _embed_with_placeholders(self, input_ids, multimodal_embeddings, is_multimodal)

    @overload
    def embed_input_ids(self, input_ids: Tensor) -> Tensor: ...

    @overload
    def embed_input_ids(
        self,
        input_ids: Tensor,
        multimodal_embeddings: MultiModalEmbeddings,
        *,
        is_multimodal: Tensor | None = None,
        handle_oov_mm_token: bool = False,
    ) -> Tensor: ...

    def embed_input_ids(
        self,
        input_ids: Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: Tensor | None = None,
        handle_oov_mm_token: bool = False,
    ) -> Tensor:
        """Newer vLLM name of :meth:`get_input_embeddings`.

        ``handle_oov_mm_token`` is accepted and needs no work: the fused path never reads the
        table at placeholder positions, so placeholder ids may lie outside the vocabulary.
        """
        if _overrides(self, "get_input_embeddings"):
            return self.get_input_embeddings(input_ids, multimodal_embeddings)
        return _embed_with_placeholders(self, input_ids, multimodal_embeddings, is_multimodal)


def _overrides(model: object, name: str) -> bool:
    """Whether ``model``'s class replaces the default ``SupportsMultiModal.<name>``."""
    return getattr(type(model), name, None) is not getattr(SupportsMultiModal, name)


def _has_items(multimodal_embeddings: MultiModalEmbeddings | None) -> bool:
    return multimodal_embeddings is not None and len(multimodal_embeddings) > 0


def _placeholder_mask(model: object, input_ids: Tensor) -> Tensor | None:
    ids = getattr(model, "placeholder_token_id", None)
    return None if ids is None else placeholder_mask(input_ids, ids)


def _embed_with_placeholders(
    model: SupportsMultiModal,
    input_ids: Tensor,
    multimodal_embeddings: MultiModalEmbeddings | None,
    is_multimodal: Tensor | None,
) -> Tensor:
    return embed_with_placeholders(
        input_ids, model.get_input_embedding_weight(), multimodal_embeddings, is_multimodal=is_multimodal,
        placeholder_token_id=getattr(model, "placeholder_token_id", None), owner=type(model).__name__,
    )


# --------------------------------------------------------------------------------------------
# LoRA, pipeline parallel, state and attention


@runtime_checkable
class SupportsLoRA(Protocol):
    """Models that serve LoRA adapters.

    ``packed_modules_mapping`` names the fused modules and their parts
    (``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``); ``embedding_modules`` maps embedding
    module names to their role; ``embedding_padding_modules`` lists those padded to the vocab.
    """

    supports_lora: ClassVar[Literal[True]] = True
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {}
    embedding_modules: ClassVar[dict[str, str]] = {}
    embedding_padding_modules: ClassVar[list[str]] = []


@runtime_checkable
class SupportsPP(Protocol):
    """Models split into pipeline-parallel stages.

    ``forward`` must accept ``intermediate_tensors`` (``None`` on the first stage); every stage
    but the last returns :class:`~pyiface.intermediate_tensors.IntermediateTensors`.
    ``make_empty_intermediate_tensors`` is usually built with
    :func:`~pyiface.intermediate_tensors.make_empty_intermediate_tensors_factory`.
    """

    supports_pp: ClassVar[Literal[True]] = True

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        """Zero tensors of what this stage receives (used by stages after the first)."""
        raise NotImplementedError(f"{type(self).__name__} does not define make_empty_intermediate_tensors")


@runtime_checkable
class HasInnerState(Protocol):
    """Models with per-sequence recurrent state (Mamba, Jamba): they get a state cache."""

    has_inner_state: ClassVar[Literal[True]] = True


@runtime_checkable
class IsAttentionFree(Protocol):
    """Models without attention (Mamba, not Jamba): no KV cache."""

    is_attention_free: ClassVar[Literal[True]] = True


@runtime_checkable
class IsHybrid(Protocol):
    """Models with both attention and Mamba layers (Jamba)."""

    is_hybrid: ClassVar[Literal[True]] = True

    @classmethod
    def get_mamba_state_shape_from_config(cls, config: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence ``(conv_state_shape, ssm_state_shape)`` of one Mamba layer, from the
        model config: ``(D, W - 1)`` and ``(D, N)`` for Mamba-1 (``D`` channels, ``W`` conv
        width, ``N`` state size)."""
        raise NotImplementedError(f"{cls.__name__} does not define get_mamba_state_shape_from_config")


@runtime_checkable
class SupportsCrossEncoding(Protocol):
    """Models that score a (query, document) pair in one pass."""

    supports_cross_encoding: ClassVar[Literal[True]] = True


@runtime_checkable
class SupportsV0Only(Protocol):
    """Models that need vLLM's V0 engine: here, the eager validated path."""

    supports_v0_only: ClassVar[Literal[True]] = True


# --------------------------------------------------------------------------------------------
# Quantization


class QuantizationConfig(abc.ABC):  # noqa: B024 - a marker base: nothing to implement
    """Base of the quantization configs that :class:`SupportsQuant` finds among constructor args.

    A config class from elsewhere (vLLM's) takes part with ``QuantizationConfig.register(cls)``.
    """

    def __init__(self) -> None:
        self.packed_modules_mapping: dict[str, list[str]] = {}


@runtime_checkable
class SupportsQuant(Protocol):
    """Models that load quantized weights.

    Before ``__init__`` runs, the model looks through its constructor arguments for a
    :class:`QuantizationConfig` (or an object whose ``quant_config`` is one, like vLLM's
    ``VllmConfig``), sets it as ``self.quant_config``, and adds the model's
    ``packed_modules_mapping`` to the config's.
    """

    supports_quant: ClassVar[Literal[True]] = True
    packed_modules_mapping: ClassVar[dict[str, list[str]] | None] = None
    quant_config: QuantizationConfig | None = None

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        instance = super().__new__(cls)
        quant_config = cls._find_quant_config(*args, **kwargs)
        if quant_config is not None:
            instance.quant_config = quant_config
            config_mapping = getattr(quant_config, "packed_modules_mapping", None)
            if cls.packed_modules_mapping and config_mapping is not None:
                config_mapping.update(cls.packed_modules_mapping)
        return instance

    @staticmethod
    def _find_quant_config(*args: object, **kwargs: object) -> QuantizationConfig | None:
        """The first quantization config among ``args`` then ``kwargs`` values, or ``None``."""
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, QuantizationConfig):
                return arg
            nested = getattr(arg, "quant_config", None)
            if isinstance(nested, QuantizationConfig):
                return nested
        return None


# --------------------------------------------------------------------------------------------
# Transcription

# ISO 639-1 codes and English names (spaces in names written as underscores).
_ISO639_1_TABLE = (
    "aa:Afar ab:Abkhazian ae:Avestan af:Afrikaans ak:Akan am:Amharic an:Aragonese ar:Arabic "
    "as:Assamese av:Avaric ay:Aymara az:Azerbaijani ba:Bashkir be:Belarusian bg:Bulgarian "
    "bi:Bislama bm:Bambara bn:Bengali bo:Tibetan br:Breton bs:Bosnian ca:Catalan ce:Chechen "
    "ch:Chamorro co:Corsican cr:Cree cs:Czech cu:Church_Slavic cv:Chuvash cy:Welsh da:Danish "
    "de:German dv:Divehi dz:Dzongkha ee:Ewe el:Greek en:English eo:Esperanto es:Spanish "
    "et:Estonian eu:Basque fa:Persian ff:Fulah fi:Finnish fj:Fijian fo:Faroese fr:French "
    "fy:Western_Frisian ga:Irish gd:Scottish_Gaelic gl:Galician gn:Guarani gu:Gujarati gv:Manx "
    "ha:Hausa he:Hebrew hi:Hindi ho:Hiri_Motu hr:Croatian ht:Haitian hu:Hungarian hy:Armenian "
    "hz:Herero ia:Interlingua id:Indonesian ie:Interlingue ig:Igbo ii:Sichuan_Yi ik:Inupiaq "
    "io:Ido is:Icelandic it:Italian iu:Inuktitut ja:Japanese jv:Javanese ka:Georgian kg:Kongo "
    "ki:Kikuyu kj:Kuanyama kk:Kazakh kl:Kalaallisut km:Khmer kn:Kannada ko:Korean kr:Kanuri "
    "ks:Kashmiri ku:Kurdish kv:Komi kw:Cornish ky:Kyrgyz la:Latin lb:Luxembourgish lg:Ganda "
    "li:Limburgish ln:Lingala lo:Lao lt:Lithuanian lu:Luba-Katanga lv:Latvian mg:Malagasy "
    "mh:Marshallese mi:Maori mk:Macedonian ml:Malayalam mn:Mongolian mr:Marathi ms:Malay "
    "mt:Maltese my:Burmese na:Nauru nb:Norwegian_Bokmal nd:North_Ndebele ne:Nepali ng:Ndonga "
    "nl:Dutch nn:Norwegian_Nynorsk no:Norwegian nr:South_Ndebele nv:Navajo ny:Chichewa "
    "oc:Occitan oj:Ojibwa om:Oromo or:Oriya os:Ossetian pa:Punjabi pi:Pali pl:Polish ps:Pashto "
    "pt:Portuguese qu:Quechua rm:Romansh rn:Rundi ro:Romanian ru:Russian rw:Kinyarwanda "
    "sa:Sanskrit sc:Sardinian sd:Sindhi se:Northern_Sami sg:Sango si:Sinhala sk:Slovak "
    "sl:Slovenian sm:Samoan sn:Shona so:Somali sq:Albanian sr:Serbian ss:Swati st:Southern_Sotho "
    "su:Sundanese sv:Swedish sw:Swahili ta:Tamil te:Telugu tg:Tajik th:Thai ti:Tigrinya "
    "tk:Turkmen tl:Tagalog tn:Tswana to:Tonga tr:Turkish ts:Tsonga tt:Tatar tw:Twi ty:Tahitian "
    "ug:Uyghur uk:Ukrainian ur:Urdu uz:Uzbek ve:Venda vi:Vietnamese vo:Volapuk wa:Walloon "
    "wo:Wolof xh:Xhosa yi:Yiddish yo:Yoruba za:Zhuang zh:Chinese zu:Zulu"
)
ISO639_1: Mapping[str, str] = {
    code: name.replace("_", " ") for code, name in (pair.split(":") for pair in _ISO639_1_TABLE.split())
}


@runtime_checkable
class SupportsTranscription(Protocol):
    """Speech-to-text models.

    ``supported_languages`` maps ISO 639-1 codes to language names; a class whose mapping holds
    another code fails at class creation with a ``ValueError`` naming it.
    """

    supports_transcription: ClassVar[Literal[True]] = True
    supported_languages: ClassVar[Mapping[str, str]]
    supports_transcription_only: ClassVar[bool] = False
    """True for models that cannot generate text from a text prompt."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_is_protocol", False):
            return
        languages = getattr(cls, "supported_languages", None)
        if not isinstance(languages, Mapping):
            raise TypeError(f"{cls.__name__}.supported_languages must be a mapping of ISO 639-1 codes")
        invalid = sorted(code for code in languages if code not in ISO639_1)
        if invalid:
            raise ValueError(
                f"{cls.__name__}.supported_languages has codes that are not ISO 639-1: {invalid}"
            )

    @classmethod
    def get_generation_prompt(
        cls,
        audio: Any,
        stt_config: Any,
        model_config: Any,
        language: str | None,
        task_type: Literal["transcribe", "translate"],
        request_prompt: str,
        to_language: str | None,
    ) -> Any:
        """The prompt (text or tokens plus the audio) for one request."""
        raise NotImplementedError(f"{cls.__name__} does not define get_generation_prompt")

    @classmethod
    def get_other_languages(cls) -> Mapping[str, str]:
        """The ISO 639-1 languages the model does not list as supported."""
        return {code: name for code, name in ISO639_1.items() if code not in cls.supported_languages}

    @classmethod
    def validate_language(cls, language: str | None) -> str | None:
        """``language`` if the model supports it; warns for another ISO 639-1 code; raises else."""
        if language is None or language in cls.supported_languages:
            return language
        if language in ISO639_1:
            warnings.warn(
                f"{cls.__name__} does not list language {language!r} as supported; results may be "
                f"less accurate (supported: {list(cls.supported_languages)})",
                InterfaceWarning,
                stacklevel=2,
            )
            return language
        raise ValueError(
            f"Unsupported language: {language!r} is not an ISO 639-1 code; {cls.__name__} supports "
            f"{list(cls.supported_languages)}"
        )

    @classmethod
    def get_speech_to_text_config(
        cls, model_config: Any, task_type: Literal["transcribe", "translate"]
    ) -> Any:
        """Audio settings (sample rate, max clip length) for the task."""
        raise NotImplementedError(f"{cls.__name__} does not define get_speech_to_text_config")

    @classmethod
    def get_num_audio_tokens(cls, audio_duration_s: float, stt_config: Any, model_config: Any) -> int | None:
        """Tokens a clip of this length becomes, without running the model; ``None`` if unknown."""
        return None


# --------------------------------------------------------------------------------------------
# Predicates


def _warn(model: object, message: str) -> None:
    """Warn at the predicate's caller (every call comes through a helper of the predicate)."""
    warnings.warn(f"The model ({_name(model)}) {message}", InterfaceWarning, stacklevel=4)


def _name(model: object) -> str:
    return model.__name__ if isinstance(model, type) else type(model).__name__


def _flag_with_members(model: object, flag: str, groups: tuple[tuple[str, ...], ...]) -> bool:
    """The flag, if ``model`` has one member of each group; warns and answers ``False`` if not."""
    if not getattr(model, flag, False):
        return False
    missing = [" or ".join(g) for g in groups if not any(hasattr(model, name) for name in g)]
    if missing:
        _warn(model, f"sets `{flag}=True` but is missing {', '.join(missing)}")
        return False
    return True


def _warn_if_unflagged(model: object, flag: str, members: tuple[str, ...]) -> None:
    """Warn when ``model`` has the members but no flag at all (``flag = False`` is a choice)."""
    if not hasattr(model, flag) and all(hasattr(model, name) for name in members):
        _warn(model, f"has all of {', '.join(members)} but does not set `{flag}=True`")


def _forward_takes_intermediate_tensors(model: object) -> bool:
    forward = getattr(model, "forward", None)
    if callable(forward) and _accepts_keyword(forward, "intermediate_tensors"):
        return True
    _warn(model, "sets `supports_pp=True` but its `forward` does not accept `intermediate_tensors`")
    return False


def _accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` can be called with ``name=...`` (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or p.kind == p.VAR_KEYWORD
        for p in params
    )


_LORA_MEMBERS = ("packed_modules_mapping", "embedding_modules", "embedding_padding_modules")


def supports_multimodal(model: object) -> bool:
    """Whether ``model`` (class or instance) takes multimodal inputs."""
    return _flag_with_members(
        model,
        "supports_multimodal",
        (("get_multimodal_embeddings", "embed_multimodal"), ("get_input_embeddings", "embed_input_ids")),
    )


def supports_lora(model: object) -> bool:
    """Whether ``model`` serves LoRA adapters (flag plus the three module maps)."""
    _warn_if_unflagged(model, "supports_lora", _LORA_MEMBERS)
    return _flag_with_members(model, "supports_lora", tuple((m,) for m in _LORA_MEMBERS))


def supports_pp(model: object) -> bool:
    """Whether ``model`` runs as pipeline-parallel stages: flag, ``make_empty_intermediate_tensors``,
    and a ``forward`` that accepts ``intermediate_tensors``."""
    _warn_if_unflagged(model, "supports_pp", ("make_empty_intermediate_tensors",))
    return _flag_with_members(
        model, "supports_pp", (("make_empty_intermediate_tensors",),)
    ) and _forward_takes_intermediate_tensors(model)


def has_inner_state(model: object) -> bool:
    """Whether ``model`` keeps per-sequence recurrent state."""
    return bool(getattr(model, "has_inner_state", False))


def is_attention_free(model: object) -> bool:
    """Whether ``model`` has no attention layers (so no KV cache)."""
    return bool(getattr(model, "is_attention_free", False))


def is_hybrid(model: object) -> bool:
    """Whether ``model`` mixes attention and Mamba layers (and can give its Mamba state shapes)."""
    return _flag_with_members(model, "is_hybrid", (("get_mamba_state_shape_from_config",),))


def supports_cross_encoding(model: object) -> bool:
    """Whether ``model`` scores (query, document) pairs."""
    return bool(getattr(model, "supports_cross_encoding", False))


def supports_quant(model: object) -> bool:
    """Whether ``model`` loads quantized weights (flag, ``packed_modules_mapping``, ``quant_config``)."""
    return _flag_with_members(model, "supports_quant", (("packed_modules_mapping",), ("quant_config",)))


def supports_transcription(model: object) -> bool:
    """Whether ``model`` transcribes speech (flag, ``supported_languages``, ``get_generation_prompt``)."""
    return _flag_with_members(
        model, "supports_transcription", (("supported_languages",), ("get_generation_prompt",))
    )


def supports_v0_only(model: object) -> bool:
    """Whether ``model`` needs the eager validated path (vLLM's V0 engine)."""
    return bool(getattr(model, "supports_v0_only", False))
