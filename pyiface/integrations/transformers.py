"""HF transformers' inner-state models on this package's ops, through transformers' own kernel hooks.

transformers (>= 5.15) routes every kernel an inner-state mixer calls through a named hook and
resolves the hooks with the ``kernels`` package: a mapping from hook name to a repository per
device and mode, applied to a model by ``kernels.kernelize``. We serve the hooks of
:mod:`pyiface.integrations._hf_ops` with layer classes from local repositories
(:mod:`pyiface.integrations._hub_layers`): no hub, no network, no copy of HF's code.

- ``apply_kernels(model)``: that model's mixers are kernelized with our mapping; other models keep
  HF's path (each mixer holds its own hook wrappers). A model transformers itself kernelizes
  (``from_pretrained``'s default, re-done on ``train()`` / ``eval()``) keeps ours: the model's
  ``kernel_config`` carries our mapping.
- ``apply_kernels()``: our mapping is registered for every model transformers kernelizes
  (``from_pretrained`` with the default ``use_kernels``, ``set_use_kernels(True)``), and it replaces
  transformers' own hub entries for these hooks, so ours wins on CUDA too. A model built with its
  constructor is not kernelized by transformers: pass it to ``apply_kernels(model)``.
- Which hooks a model gets follows the inner-state kind its config describes
  (:func:`~pyiface.integrations.hf_config.inner_state`), never its name: a new family whose mixers
  call these hooks needs no entry here. A Mamba-2 mixer's gated RMSNorm class has no hook of
  transformers'; ``kernels.replace_kernel_forward_from_hub`` gives it one (:data:`MAMBA2_GATED_NORM`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import pathlib
import re
import warnings
import weakref
from collections.abc import Iterable

import torch

from pyiface.integrations import _hub_layers as hub
from pyiface.integrations._hf_ops import CACHE_HOOKS, MAMBA2_GATED_NORM
from pyiface.integrations.hf_config import INNER_STATE_KINDS, InnerState, inner_state, interface_flags

__all__ = ["KIND_HOOKS", "MIN_TRANSFORMERS", "KernelReport", "apply_kernels", "interface_flags",
           "mamba2_gated_norm_class", "revert_kernels"]

# The first transformers whose inner-state mixers carry kernel hooks (``use_kernelized_func``); before it
# the mixers chose their kernels inline and nothing outside them could reach the choice.
MIN_TRANSFORMERS = "5.15"

_CONV = ("causal_conv1d_fn", "causal_conv1d_update")
# Inner-state kind -> the hooks of ours its mixers get.
KIND_HOOKS: dict[str, tuple[str, ...]] = {
    "mamba": ("selective_scan_fn", "selective_state_update", *_CONV, "mamba_inner_fn"),
    "mamba2": ("mamba_chunk_scan_combined", "selective_state_update", *_CONV, "mamba_split_conv1d_scan_combined",
               MAMBA2_GATED_NORM),
    "short_conv": _CONV,
    "gated_delta_rule": _CONV,
    "kda": _CONV,
}
# Hooks of inner-state layers that we do not serve (yet): reported, and warned about.
_UNSERVED_INNER_HOOKS = ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_kda",
                         "fused_recurrent_kda", "RMSNormGated")
_INNER_HOOKS = {*hub.SERVED, *CACHE_HOOKS, *_UNSERVED_INNER_HOOKS}

_PATCHED_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its kernel_config before
_PROCESS_WIDE: dict = {}  # while apply_kernels() is in force: the hooks, transformers' entries we replaced
_TAGGED_NORMS: set[type] = set()  # gated-norm classes we gave MAMBA2_GATED_NORM


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """One model class: its inner-state kind, the hooks now running ours, on which devices, and the
    hooks of its inner-state layers that stay HF's (``unserved``)."""

    model: str
    kind: str | None
    hooks: tuple[str, ...]
    devices: tuple[str, ...]
    unserved: tuple[str, ...] = ()


class KernelReport(list):
    """What :func:`apply_kernels` did: a list of :class:`ModelReport`, printed as a table."""

    def hooks(self, model: str | None = None) -> tuple[str, ...]:
        """The hooks running ours, for one model class (default: the first row)."""
        rows = [r for r in self if model is None or r.model == model]
        return rows[0].hooks if rows else ()

    def __str__(self) -> str:
        header = ("model", "inner state", "hooks on our ops", "devices", "stays HF's")
        rows = [header] + [(r.model, r.kind or "-", ", ".join(r.hooks) or "-", ", ".join(r.devices) or "-",
                            ", ".join(r.unserved) or "-") for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        body = ["| " + " | ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + " |" for row in rows]
        return "\n".join([line, body[0], line, *body[1:], line])


def _check_version() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"pyiface.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} (the first release whose "
            f"inner-state mixers carry kernel hooks); the installed transformers {transformers.__version__} "
            "chooses its kernels inside the mixers")


def _kinds(families: Iterable[str] | str | None) -> tuple[str, ...]:
    if families is None:
        return INNER_STATE_KINDS
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in KIND_HOOKS]
    if unknown:
        raise ValueError(f"families: unknown inner-state kind(s) {unknown}; known: {', '.join(KIND_HOOKS)}")
    return families


@contextlib.contextmanager
def _quiet_kernels():
    """kernels warns for every hook wrapper with no mapping (HF's cache hooks, attention's rotary): expected."""
    logger = logging.getLogger("kernels._internals.layer.layer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _wrappers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The hook wrappers a mixer holds (``use_kernelized_func``), by hook name."""
    return {type(w).kernel_layer_name: w for w in getattr(module, "_kernel_funcs", {}).values()}


def _mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose kernel hooks include an inner-state one."""
    return [m for m in model.modules() if _INNER_HOOKS & set(_wrappers(m))]


def _is_mamba2_gated_norm(cls: type) -> bool:
    """A Mamba-2 mixer's gated RMSNorm class (``<Family>RMSNormGated``, however a release spells the family),
    with no hook of transformers' own (the delta-rule families' ``RMSNormGated`` has one)."""
    hook = getattr(cls, "kernel_layer_name", None)
    return cls.__name__.endswith("RMSNormGated") and hook in (None, MAMBA2_GATED_NORM)


def mamba2_gated_norm_class(module) -> type:
    """The Mamba-2 gated RMSNorm class of a modeling module, however the installed release names it
    (5.24's ``MambaRMSNormGated`` is 5.25's ``Mamba2RMSNormGated``)."""
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, torch.nn.Module) and _is_mamba2_gated_norm(v)]
    if len(found) != 1:
        raise LookupError(f"{module.__name__}: expected one <Family>RMSNormGated class, found {found}")
    return found[0]


def _tag_norm(cls: type) -> None:
    if getattr(cls, "kernel_layer_name", None) is None:
        from kernels import replace_kernel_forward_from_hub

        replace_kernel_forward_from_hub(cls, MAMBA2_GATED_NORM)
        _TAGGED_NORMS.add(cls)


def _device(model: torch.nn.Module) -> str:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def _report(model: torch.nn.Module, state: InnerState | None, served: tuple[str, ...]) -> ModelReport:
    present = set()
    for mixer in _mixers(model):
        present |= set(_wrappers(mixer))
    present |= {getattr(type(m), "kernel_layer_name", None) for m in model.modules()}
    running = tuple(h for h in served if h in present)
    unserved = tuple(h for h in _UNSERVED_INNER_HOOKS if h in present)
    return ModelReport(type(model).__name__, state.kind if state else None, running, hub.DEVICES, unserved)


def apply_kernels(model: torch.nn.Module | None = None, *, families: Iterable[str] | str | None = None) -> KernelReport:
    """Run HF transformers' inner-state layers on this package's ops.

    Args:
        model: a loaded model (``<Family>ForCausalLM``, a backbone, a peft model's base): kernelize that
            model only. None: process-wide, for every model transformers kernelizes from now on
            (``from_pretrained`` by default; ``model.set_use_kernels(True)``).
        families: restrict to these inner-state kinds (:data:`KIND_HOOKS` keys: ``"mamba"``, ``"mamba2"``,
            ``"short_conv"``, ``"gated_delta_rule"``, ``"kda"``).

    Returns a :class:`KernelReport` (prints as a table): per model class, the hooks now running ours, on
    which devices, and the hooks of its inner-state layers that stay HF's (also warned about). Calling
    it twice is harmless. Raises ``ValueError`` for a model with no inner-state layer of the selected
    kinds, or an unknown kind; ``RuntimeError`` for a transformers older than :data:`MIN_TRANSFORMERS`.

    Example:
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2))
        >>> apply_kernels(model).hooks()
        ('selective_scan_fn', 'selective_state_update', 'causal_conv1d_fn', 'causal_conv1d_update', 'mamba_inner_fn')
    """
    _check_version()
    kinds = _kinds(families)
    if model is None:
        return _apply_process_wide(kinds)
    return _apply_to_model(model, kinds)


def _apply_to_model(model: torch.nn.Module, kinds: tuple[str, ...]) -> KernelReport:
    import kernels

    config = getattr(model, "config", None)
    state = inner_state(config) if config is not None else None
    mixers = _mixers(model)
    if state is None or state.kind not in kinds or not mixers:
        what = f"a {state.kind} model" if state is not None else "no inner-state layer in its config"
        raise ValueError(f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r}): {what}, "
                         f"{len(mixers)} mixer(s) with kernel hooks; apply_kernels serves {', '.join(kinds)}; "
                         "nothing patched")
    served = KIND_HOOKS[state.kind]
    if MAMBA2_GATED_NORM in served:
        for mixer in mixers:
            for sub in mixer.modules():
                if _is_mamba2_gated_norm(type(sub)):
                    _tag_norm(type(sub))
    ours = hub.mapping(hub.PER_MODEL, served)
    mode = kernels.Mode.TRAINING if model.training else kernels.Mode.INFERENCE
    with _quiet_kernels(), kernels.use_kernel_mapping(ours):
        for mixer in mixers:
            kernels.kernelize(mixer, mode=mode, device=_device(model), use_fallback=kernels.KernelizeFallback.ALL)
    _keep_on_rekernelize(model, ours)
    report = KernelReport([_report(model, state, served)])
    _warn_unserved(report)
    return report


def _keep_on_rekernelize(model: torch.nn.Module, ours: dict) -> None:
    """transformers re-kernelizes a model it loaded on ``train()`` / ``eval()``, from the model's
    ``kernel_config`` over the global mapping: put ours in it (the model's own entries kept)."""
    if not hasattr(model, "set_use_kernels"):
        return
    from transformers import KernelConfig

    previous = _PATCHED_MODELS.get(model, getattr(model, "kernel_config", None))
    _PATCHED_MODELS[model] = previous
    base = dict(previous.kernel_mapping) if previous is not None else {}
    model.kernel_config = KernelConfig(kernel_mapping={**base, **ours}, inherit_mapping=True)


def _warn_unserved(report: KernelReport) -> None:
    for row in report:
        if row.unserved:
            warnings.warn(f"{row.model}: its inner-state hooks {', '.join(row.unserved)} stay HF's (not served by "
                          "iface-kernels yet)", stacklevel=3)


@functools.cache
def _modeling_files_calling(hook: str) -> tuple[str, ...]:
    """The transformers modeling modules whose source calls ``hook`` (read, not imported)."""
    import transformers

    root = pathlib.Path(transformers.__file__).parent / "models"
    pattern = re.compile(rf"\b{re.escape(hook)}\b")
    return tuple(f"transformers.models.{p.parent.name}.{p.stem}" for p in sorted(root.glob("*/modeling_*.py"))
                 if pattern.search(p.read_text(encoding="utf-8", errors="ignore")))


def _tag_mamba2_norms_of_installed_families() -> None:
    """Process-wide: give a hook to the gated-norm class of every installed family with Mamba-2 mixers."""
    for name in _modeling_files_calling("mamba_chunk_scan_combined"):
        with contextlib.suppress(LookupError):  # a family whose gate goes into the decode step (falcon_h1) has one too
            _tag_norm(mamba2_gated_norm_class(importlib.import_module(name)))


def _apply_process_wide(kinds: tuple[str, ...]) -> KernelReport:
    import kernels
    from transformers.integrations import hub_kernels

    hooks = tuple(dict.fromkeys(h for kind in kinds for h in KIND_HOOKS[kind]))
    if not hub_kernels._kernels_enabled():
        warnings.warn("USE_HUB_KERNELS disables transformers' kernelize: models loaded with from_pretrained keep "
                      "HF's path; use apply_kernels(model)", stacklevel=3)
    if MAMBA2_GATED_NORM in hooks:
        _tag_mamba2_norms_of_installed_families()
    ours = hub.mapping(hub.PROCESS_WIDE, hooks)
    kernels.register_kernel_mapping(ours)
    defaults = hub_kernels.get_kernel_mapping_transformers()  # what from_pretrained registers: ours win there
    replaced = _PROCESS_WIDE.setdefault("replaced", {})
    for hook in hooks:
        replaced.setdefault(hook, defaults.get(hook))
        defaults[hook] = ours[hook]
    _PROCESS_WIDE.setdefault("hooks", set()).update(hooks)
    hub.process_wide[0] = True
    return KernelReport([ModelReport(f"every {kind} model transformers kernelizes", kind, KIND_HOOKS[kind],
                                     hub.DEVICES) for kind in kinds])


def revert_kernels(model: torch.nn.Module | None = None) -> None:
    """Give HF its path back, bit for bit: with a model, that model's hooks; with none, everything
    :func:`apply_kernels` did (the process-wide mapping, so models it reached run HF's code again, and
    every patched model). Harmless twice."""
    if model is not None:
        _revert_model(model)
        return
    for patched in list(_PATCHED_MODELS):
        _revert_model(patched)
    if _PROCESS_WIDE:
        _revert_process_wide()
    for cls in _TAGGED_NORMS:
        for attr in ("kernel_layer_name", "kernel_condition"):
            if attr in cls.__dict__:
                delattr(cls, attr)
    _TAGGED_NORMS.clear()


def _revert_model(model: torch.nn.Module) -> None:
    for module in model.modules():
        for target in (module, *getattr(module, "_kernel_funcs", {}).values()):
            if hub.ours(target.__dict__.get("forward")):
                target.__dict__.pop("forward")
                target.__dict__.pop("_kernel_repo", None)
    if model in _PATCHED_MODELS:
        model.kernel_config = _PATCHED_MODELS.pop(model)


def _revert_process_wide() -> None:
    import kernels
    from transformers.integrations import hub_kernels

    hub.process_wide[0] = False
    hooks = _PROCESS_WIDE.pop("hooks")
    # no repository for our hooks: kernelize keeps each wrapper's own forward (transformers registers
    # its own entries again when it next kernelizes)
    kernels.register_kernel_mapping({hook: {device: {} for device in hub.DEVICES} for hook in hooks})
    defaults = hub_kernels.get_kernel_mapping_transformers()
    for hook, entry in _PROCESS_WIDE.pop("replaced").items():
        if entry is None:
            defaults.pop(hook, None)
        else:
            defaults[hook] = entry
