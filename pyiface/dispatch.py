"""Read a model's interface flags and hand it the kernels, state and execution path it needs.

``plan(model_or_class)`` branches on the predicates only (never on model names) and returns a
:class:`KernelPlan`; ``print(plan(...))`` shows it as a table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from pyiface import interfaces as itf
from pyiface.integrations import hf_config
from pyiface.mamba_cache import MambaCache
from pyiface.multimodal import MultiModalEmbedder
from pyiface.pipeline import pp_layer_range
from triton_kernels import registry
from triton_kernels._csrc import ExtensionBuildError
from triton_kernels.backend import BackendUnavailableError, Op

# The ops each capability runs (declared in triton_kernels.registry).
OPS_BY_CAPABILITY: dict[str, tuple[Op, ...]] = {
    "multimodal": (registry.MULTIMODAL_SCATTER,),
    "lora": (registry.ADD_LORA_LINEAR, registry.LORA_SHRINK, registry.LORA_EXPAND),
    "mamba": (registry.SELECTIVE_SCAN, registry.SELECTIVE_STATE_UPDATE, registry.CAUSAL_CONV1D_VARLEN,
              registry.CAUSAL_CONV1D_UPDATE),
    # a Mamba-2 mixer: its SSM state has heads ([H, P, N])
    "mamba2": (registry.MAMBA_CHUNK_SCAN, registry.SELECTIVE_STATE_UPDATE, registry.CAUSAL_CONV1D_VARLEN,
               registry.CAUSAL_CONV1D_UPDATE, registry.RMS_NORM_GATED),
    # a short-conv (LFM2-style) or linear-attention layer: its conv is ours (the delta rules are not yet)
    "short_conv": (registry.CAUSAL_CONV1D_VARLEN, registry.CAUSAL_CONV1D_UPDATE),
}
# The capability of each inner-state kind an HF config describes (pyiface.integrations.hf_config).
CAPABILITY_BY_KIND = {"mamba": "mamba", "mamba2": "mamba2", "short_conv": "short_conv",
                      "gated_delta_rule": "short_conv", "kda": "short_conv"}

FLAG_PREDICATES = {
    "supports_multimodal": itf.supports_multimodal,
    "supports_lora": itf.supports_lora,
    "supports_pp": itf.supports_pp,
    "has_inner_state": itf.has_inner_state,
    "is_attention_free": itf.is_attention_free,
    "is_hybrid": itf.is_hybrid,
    "supports_cross_encoding": itf.supports_cross_encoding,
    "supports_quant": itf.supports_quant,
    "supports_transcription": itf.supports_transcription,
    "supports_v0_only": itf.supports_v0_only,
}


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model's steps run, honoured by the building blocks the plan hands out.

    ``validated`` (``SupportsV0Only`` models, vLLM's V0 engine): eager, and every value check
    reads the data (one host sync each), whatever counts the caller holds on the host. Otherwise
    the graph-safe fast path: a block given a host-side count trusts it instead of syncing
    (:class:`~pyiface.multimodal.MultiModalEmbedder`'s ``num_placeholders``), and CUDA graphs may
    be captured (value checks are skipped during capture either way).
    """

    validated: bool

    def __str__(self) -> str:
        if self.validated:
            return "eager, validated (SupportsV0Only): value checks read the data"
        return "graph-safe fast path: host-side counts replace syncs"


@dataclasses.dataclass
class MambaStatePlan:
    """Per-sequence Mamba state shapes of one layer (``None`` until a config gives them) and the
    cache, allocated when the plan was given ``max_num_seqs`` and ``num_mamba_layers``."""

    conv_state_shape: tuple[int, ...] | None
    ssm_state_shape: tuple[int, ...] | None
    cache: Any = None
    kind: str | None = None  # an HF model's inner-state kind (pyiface.integrations.hf_config.INNER_STATE_KINDS)
    layers: int | None = None  # ... and how many of its layers keep that state


@dataclasses.dataclass
class PipelinePlan:
    pp_rank: int
    pp_size: int
    layer_range: tuple[int, int] | None  # None until the number of layers is known
    make_empty_intermediate_tensors: Any  # the model's factory (None for a class)


@dataclasses.dataclass
class KernelPlan:
    """What a model gets. ``backends`` maps each op it runs to the backend that will run it on
    ``device``; ``tasks`` tells the serving layer which requests the model answers (generate,
    score, transcription); ``execution`` is honoured by :meth:`make_embedder`."""

    model: str
    device: torch.device
    flags: dict[str, bool]
    lora_wrapper: Any
    packed_modules_mapping: dict[str, list[str]]
    mamba: MambaStatePlan | None
    needs_kv_cache: bool
    pipeline: PipelinePlan | None
    tasks: tuple[str, ...]
    execution: Execution
    quant_config: Any
    backends: dict[str, str]

    def make_embedder(
        self, embedding: nn.Embedding, placeholder_token_id: int | list[int] | None = None
    ) -> nn.Module:
        """The token embedding the model should run: for a multimodal model a
        :class:`~pyiface.multimodal.MultiModalEmbedder` over ``embedding`` (fused lookup and
        scatter, following :attr:`execution`), else ``embedding`` itself."""
        if not self.flags["supports_multimodal"]:
            return embedding
        if placeholder_token_id is None:
            raise ValueError(f"{self.model} is multimodal: make_embedder needs its placeholder_token_id")
        return MultiModalEmbedder(embedding, placeholder_token_id, validated=self.execution.validated)

    def __str__(self) -> str:
        rows = [
            ("model", self.model),
            ("device", str(self.device)),
            ("flags", ", ".join(name for name, on in self.flags.items() if on) or "(none)"),
            ("embedding", "fused multimodal scatter (MultiModalEmbedder)" if self.flags["supports_multimodal"]
             else "plain embedding"),
            ("lora", "batch wrapper" if self.lora_wrapper is not None else
             ("enabled (wrapper built when max_loras is given)" if self.flags["supports_lora"] else "-")),
            ("packed modules", ", ".join(f"{k}={'+'.join(v)}" for k, v in self.packed_modules_mapping.items()) or "-"),
            ("mamba state", _describe_mamba(self.mamba)),
            ("kv cache", "yes" if self.needs_kv_cache else "no (attention-free)"),
            ("pipeline", _describe_pipeline(self.pipeline)),
            ("tasks", ", ".join(self.tasks)),
            ("execution", str(self.execution)),
            ("quantization", type(self.quant_config).__name__ if self.quant_config is not None else "-"),
        ] + [(f"op {op}", backend) for op, backend in self.backends.items()]
        width = max(len(k) for k, _ in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 62 + "+"
        body = [f"| {k:<{width}} | {v:<60} |" for k, v in rows]
        return "\n".join([line, *body, line])


def _describe_mamba(mamba: MambaStatePlan | None) -> str:
    if mamba is None:
        return "-"
    shapes = (f"conv {mamba.conv_state_shape}, ssm {mamba.ssm_state_shape}"
              if mamba.conv_state_shape is not None else "shapes from the config at load")
    if mamba.kind is not None:
        shapes = f"{mamba.kind} x {mamba.layers} layers: {shapes}"
    return shapes + (", cache allocated" if mamba.cache is not None else "")


def _describe_pipeline(pp: PipelinePlan | None) -> str:
    if pp is None:
        return "-"
    layers = f", layers [{pp.layer_range[0]}, {pp.layer_range[1]})" if pp.layer_range else ""
    return f"rank {pp.pp_rank} of {pp.pp_size}{layers}"


def _check_consistent(name: str, flags: dict[str, bool]) -> None:
    if flags["is_attention_free"] and flags["is_hybrid"]:
        raise ValueError(f"{name} is both IsAttentionFree and IsHybrid: a hybrid model has attention layers")
    if flags["is_hybrid"] and not flags["has_inner_state"]:
        raise ValueError(f"{name} is IsHybrid but not HasInnerState: its Mamba layers keep state")
    if flags["is_attention_free"] and not flags["has_inner_state"]:
        raise ValueError(f"{name} is IsAttentionFree but not HasInnerState: with neither attention nor "
                         "state it cannot see past tokens")


def _backends(capabilities: list[str], device: torch.device) -> dict[str, str]:
    chosen = {}
    for cap in capabilities:
        for op in OPS_BY_CAPABILITY[cap]:
            try:
                chosen[op.name] = op.resolve(device)
            except (BackendUnavailableError, ExtensionBuildError) as exc:
                chosen[op.name] = f"unavailable: {exc}"
    return chosen


def _mamba_plan(model_or_class: Any, name: str, config: Any, max_num_seqs: int | None,
                num_mamba_layers: int | None, device: torch.device, dtype: torch.dtype) -> MambaStatePlan:
    """State shapes from the model's ``get_mamba_state_shape_from_config`` (hybrid models), else
    from what :meth:`MambaCache.from_config` allocates for the HF-style Mamba config (pure Mamba
    models: the same code reads the config for the shapes and for the cache)."""
    if config is None:
        return MambaStatePlan(None, None)
    shape_fn = getattr(model_or_class, "get_mamba_state_shape_from_config", None)
    if shape_fn is None:
        if num_mamba_layers is not None and num_mamba_layers != getattr(config, "num_hidden_layers", None):
            raise ValueError(f"{name} is a pure Mamba model: its layers are the config's num_hidden_layers "
                             f"({getattr(config, 'num_hidden_layers', None)}), got num_mamba_layers={num_mamba_layers}")
        try:
            probe = MambaCache.from_config(config, 1, ssm_dtype=dtype, device="meta")
        except AttributeError as exc:
            raise ValueError(f"{name}: its config has no {exc.name!r}; MambaCache.from_config reads num_hidden_layers, "
                             "intermediate_size, state_size and conv_kernel (or define "
                             "get_mamba_state_shape_from_config)") from exc
        cache = None
        if max_num_seqs is not None:
            cache = MambaCache.from_config(config, max_num_seqs, ssm_dtype=dtype, device=device)
        return MambaStatePlan(tuple(probe.conv_state.shape[2:]), tuple(probe.ssm_state.shape[2:]), cache)
    conv_shape, ssm_shape = (tuple(s) for s in shape_fn(config))
    cache = None
    if max_num_seqs is not None and num_mamba_layers is not None:
        cache = MambaCache(
            num_mamba_layers, max_num_seqs, dim=conv_shape[0], state_size=ssm_shape[-1],
            conv_width=conv_shape[-1] + 1, num_heads=ssm_shape[0] if len(ssm_shape) == 3 else None,
            ssm_dtype=dtype, device=device,
        )
    return MambaStatePlan(conv_shape, ssm_shape, cache)


def plan(
    model_or_class: Any,
    device: torch.device | str | None = None,
    *,
    config: Any = None,
    max_num_seqs: int | None = None,
    num_mamba_layers: int | None = None,
    max_loras: int | None = None,
    max_num_tokens: int | None = None,
    pp_rank: int = 0,
    pp_size: int = 1,
    num_layers: int | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> KernelPlan:
    """The :class:`KernelPlan` for a model class or instance.

    ``device`` defaults to CUDA when present. ``config`` (default: the instance's ``config``)
    gives models with inner state their Mamba state shapes: through the model's
    ``get_mamba_state_shape_from_config`` (hybrid models), else as
    :meth:`MambaCache.from_config` reads an HF-style Mamba config (pure Mamba models). The state
    cache is allocated with ``max_num_seqs`` (and, for hybrid models, ``num_mamba_layers``).
    ``max_loras`` and ``max_num_tokens`` build the LoRA batch wrapper. ``execution`` is the
    validated eager path for ``SupportsV0Only`` models, else the graph-safe fast path; the
    embedder from :meth:`KernelPlan.make_embedder` follows it. Raises ``ValueError`` for
    contradictory flags.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    name = cls.__name__
    if config is None and not isinstance(model_or_class, type):
        config = getattr(model_or_class, "config", None)
    if hf_config.is_hf_model(model_or_class):
        return _plan_hf(model_or_class, name, config, device, pp_rank, pp_size, num_layers)
    flags = {flag: predicate(model_or_class) for flag, predicate in FLAG_PREDICATES.items()}
    _check_consistent(name, flags)

    capabilities = []
    if flags["supports_multimodal"]:
        capabilities.append("multimodal")
    lora_wrapper = None
    if flags["supports_lora"]:
        capabilities.append("lora")
        if max_loras is not None and max_num_tokens is not None:
            from pyiface.lora import LoRABatchWrapper

            lora_wrapper = LoRABatchWrapper(max_loras, max_num_tokens, device)
    mamba = None
    if flags["has_inner_state"]:
        mamba = _mamba_plan(model_or_class, name, config, max_num_seqs, num_mamba_layers, device, state_dtype)
        heads = mamba.ssm_state_shape is not None and len(mamba.ssm_state_shape) == 3
        capabilities.append("mamba2" if heads else "mamba")
    pipeline = None
    if flags["supports_pp"]:
        factory = None if isinstance(model_or_class, type) else model_or_class.make_empty_intermediate_tensors
        layers = pp_layer_range(num_layers, pp_rank, pp_size) if num_layers is not None else None
        pipeline = PipelinePlan(pp_rank, pp_size, layers, factory)
    elif pp_size > 1:
        raise ValueError(f"{name} does not support pipeline parallelism (SupportsPP), got pp_size={pp_size}")

    tasks = ["generate"]
    if flags["supports_cross_encoding"]:
        tasks.append("score")
    if flags["supports_transcription"]:
        tasks.append("transcription")
    return KernelPlan(
        model=name,
        device=device,
        flags=flags,
        lora_wrapper=lora_wrapper,
        packed_modules_mapping=dict(getattr(model_or_class, "packed_modules_mapping", {}) or {}),
        mamba=mamba,
        needs_kv_cache=not flags["is_attention_free"],
        pipeline=pipeline,
        tasks=tuple(tasks),
        execution=Execution(validated=flags["supports_v0_only"]),
        quant_config=getattr(model_or_class, "quant_config", None) if flags["supports_quant"] else None,
        backends=_backends(capabilities, device),
    )


def _plan_hf(model: Any, name: str, config: Any, device: torch.device, pp_rank: int, pp_size: int,
             num_layers: int | None) -> KernelPlan:
    """The plan of an HF transformers (or peft) model: flags and inner state read from its config
    (:func:`~pyiface.integrations.hf_config.interface_flags`), as vLLM gives that architecture."""
    flags = hf_config.interface_flags(model)
    _check_consistent(name, flags)
    state = hf_config.inner_state(config)
    optional = (("multimodal", "supports_multimodal"), ("lora", "supports_lora"))
    capabilities = [cap for cap, flag in optional if flags[flag]]
    mamba = None
    if state is not None:
        mamba = MambaStatePlan(state.conv_state_shape, state.ssm_state_shape, kind=state.kind,
                               layers=state.state_layers)
        capabilities.append(CAPABILITY_BY_KIND[state.kind])
    layers = num_layers if num_layers is not None else getattr(hf_config.text_config(config), "num_hidden_layers", None)
    pipeline = PipelinePlan(pp_rank, pp_size, pp_layer_range(layers, pp_rank, pp_size) if layers else None, None)
    return KernelPlan(
        model=name, device=device, flags=flags, lora_wrapper=None, packed_modules_mapping={}, mamba=mamba,
        needs_kv_cache=not flags["is_attention_free"], pipeline=pipeline, tasks=("generate",),
        execution=Execution(validated=False), quant_config=None, backends=_backends(capabilities, device))
