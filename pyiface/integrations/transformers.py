"""HF transformers' Mamba mixers on this package's ops (Liger-Kernel style patching).

Where transformers (5.x) decides: each ``modeling_<family>.py`` defines module-level functions
(Mamba-1: ``mamba_selective_scan``, ``mamba_selective_state_update``; Mamba-2:
``mamba2_chunk_scan``, ``mamba2_selective_state_update``, ``mamba2_split_conv1d_scan_combined``;
both: ``causal_conv1d_fn``, ``causal_conv1d_update``) wrapped by
``use_kernel_func_from_hub_with_fallback``, which binds them at import time to the ``mamba_ssm`` /
``causal_conv1d`` kernels when those packages import, else to HF's torch code; the mixer's
``forward`` looks the names up in its module globals on every call. (A config's
``use_mamba_kernels=False`` only warns in 5.x: it no longer chooses.)
Those globals are the narrowest point that covers CPU and GPU alike, so they are what we replace:

- process-wide (``apply_kernels()``): the names in each family's modeling module;
- one model (``apply_kernels(model)``): each of its mixers gets a ``forward`` that is HF's own
  code (and decorators) bound to a private copy of the module globals holding our functions.
  Nothing shared changes, so other models keep HF's path, eager and under ``torch.compile``
  (dynamo guards a global on the globals dict of the frame it traces).

A family is one :class:`Family` table entry. What stays HF's in Mamba-2 mixers: the gated
RMSNorm is an ``nn.Module`` (``<Family>RMSNormGated``), not a kernel function, so it keeps HF's
torch code (fp32 copies of the scan output and gate) on the unfused path. When training, the
mixers first call a fused function (Mamba: ``mamba_inner_fn``, every Mamba-2 family:
``mamba2_split_conv1d_scan_combined``); those are ours too, with mamba_ssm's semantics, as HF runs
them when mamba_ssm is installed (its torch stand-ins return None and the mixer goes unfused).
falcon_mamba's call carries B/C/dt RMS norms ours lacks, so it is not patched there: the mixer then
trains unfused, on our scan and conv.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping

import torch

from pyiface.integrations._hf_mamba import MAMBA1_FUNCTIONS, MAMBA1_FUSED_FUNCTIONS, MAMBA2_FUNCTIONS

MIN_TRANSFORMERS = "5.0"  # the module-level kernel functions; 4.x chose in the mixer instead
TESTED_TRANSFORMERS = ("5.24.0",)


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model family: the module whose globals its mixers call, the mixer classes, and the
    replacement factory (``HF's function -> ours``) of each global."""

    module: str
    mixers: tuple[str, ...]
    functions: Mapping[str, Callable[[Callable], Callable]]


def _mamba1(name: str, mixer: str, functions: Mapping[str, Callable] = MAMBA1_FUNCTIONS) -> Family:
    return Family(f"transformers.models.{name}.modeling_{name}", (mixer,), functions)


def _mamba2(name: str, mixer: str) -> Family:
    return Family(f"transformers.models.{name}.modeling_{name}", (mixer,), MAMBA2_FUNCTIONS)


FAMILIES: dict[str, Family] = {
    "mamba": _mamba1("mamba", "MambaMixer", MAMBA1_FUSED_FUNCTIONS),
    "falcon_mamba": _mamba1("falcon_mamba", "FalconMambaMixer"),
    "jamba": _mamba1("jamba", "JambaMambaMixer"),
    "zamba": _mamba1("zamba", "ZambaMambaMixer"),
    "mamba2": _mamba2("mamba2", "Mamba2Mixer"),
    "bamba": _mamba2("bamba", "BambaMixer"),
    "falcon_h1": _mamba2("falcon_h1", "FalconH1Mixer"),
    "granitemoehybrid": _mamba2("granitemoehybrid", "GraniteMoeHybridMambaLayer"),
    "nemotron_h": _mamba2("nemotron_h", "NemotronHMamba2Mixer"),
    "zamba2": _mamba2("zamba2", "Zamba2MambaMixer"),
}

_ORIGINALS: dict[tuple[str, str], Callable] = {}  # (module, global) -> HF's function, while patched
_PATCHED_MIXERS: weakref.WeakSet = weakref.WeakSet()  # mixers with a per-instance forward


def _check_version() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"pyiface.integrations.transformers supports transformers >= {MIN_TRANSFORMERS} (tested: "
            f"{', '.join(TESTED_TRANSFORMERS)}); the installed transformers {transformers.__version__} "
            "chooses its Mamba kernels differently")


def _load(name: str) -> types.ModuleType | None:
    """The family's modeling module, None when the installed transformers lacks the family;
    raises when it has the family but not the names we replace."""
    family = FAMILIES[name]
    try:
        module = importlib.import_module(family.module)
    except ModuleNotFoundError:
        return None
    missing = [n for n in (*family.functions, *family.mixers) if not hasattr(module, n)]
    if missing:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__}: {family.module} has no {missing}; "
                           f"pyiface.integrations.transformers was tested with {', '.join(TESTED_TRANSFORMERS)}")
    return module


def _known(families: Iterable[str] | None) -> list[str]:
    if families is None:
        return list(FAMILIES)
    if isinstance(families, str):
        families = [families]
    known = []
    for name in families:
        if name in FAMILIES:
            known.append(name)
        else:
            warnings.warn(f"unknown model family {name!r} ignored; supported: {', '.join(FAMILIES)}", stacklevel=3)
    return known


@functools.cache
def _replacement(module: str, name: str, factory: Callable, original: Callable) -> Callable:
    """One replacement object per HF function, so repeated patches install the same object."""
    return factory(original)


def _original(module: types.ModuleType, name: str) -> Callable:
    return _ORIGINALS.get((module.__name__, name), getattr(module, name))


def _ours(module: types.ModuleType, family: Family) -> dict[str, Callable]:
    return {n: _replacement(module.__name__, n, f, _original(module, n)) for n, f in family.functions.items()}


def apply_kernels(model: torch.nn.Module | None = None, *,
                  families: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Route HF's Mamba mixers to this package's ops.

    Args:
        model: None: patch every supported family the installed transformers has, process-wide
            (models built later included). A loaded model: patch only its mixers.
        families: restrict to these family names (keys of :data:`FAMILIES`: ``"mamba"``,
            ``"falcon_mamba"``, ``"jamba"``, ``"zamba"``, ``"mamba2"``, ``"bamba"``, ``"falcon_h1"``,
            ``"granitemoehybrid"``, ``"nemotron_h"``, ``"zamba2"``); an unknown name warns and is skipped.

    Returns ``{family: [HF function names now running our ops]}``. Calling it twice is harmless.
    Raises ``ValueError`` for a model with no mixer of a supported family (nothing patched) and
    ``RuntimeError`` for an unsupported transformers version.

    Example:
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2))
        >>> apply_kernels(model)
        {'mamba': ['mamba_selective_scan', 'mamba_selective_state_update', 'causal_conv1d_fn', 'causal_conv1d_update',
                   'mamba_inner_fn']}
    """
    _check_version()
    names = _known(families)
    if model is None:
        return _apply_process_wide(names)
    return _apply_to_model(model, names)


def _apply_process_wide(names: list[str]) -> dict[str, list[str]]:
    patched = {}
    for name in names:
        module = _load(name)
        if module is None:
            continue
        family = FAMILIES[name]
        ours = _ours(module, family)
        for fn_name, fn in ours.items():
            _ORIGINALS.setdefault((module.__name__, fn_name), getattr(module, fn_name))
            setattr(module, fn_name, fn)
        patched[name] = list(ours)
    return patched


def _mixers(model: torch.nn.Module, names: list[str]) -> list[tuple[str, torch.nn.Module, types.ModuleType]]:
    classes = []
    for name in names:
        module = _load(name)
        if module is not None:
            classes += [(name, getattr(module, m), module) for m in FAMILIES[name].mixers]
    return [(name, sub, module) for sub in model.modules() for name, cls, module in classes if type(sub) is cls]


def _apply_to_model(model: torch.nn.Module, names: list[str]) -> dict[str, list[str]]:
    found = _mixers(model, names)
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) has no mixer of a supported family "
            f"({', '.join(names) or 'none selected'}); nothing patched")
    patched: dict[str, list[str]] = {}
    forwards: dict[type, Callable] = {}
    for name, mixer, module in found:
        family = FAMILIES[name]
        if type(mixer) not in forwards:
            forwards[type(mixer)] = _rebound_forward(type(mixer).forward, _ours(module, family))
        mixer.forward = types.MethodType(forwards[type(mixer)], mixer)
        _PATCHED_MIXERS.add(mixer)
        patched[name] = list(family.functions)
    return patched


def _rebound_forward(forward: Callable, ours: dict[str, Callable]) -> Callable:
    """A copy of ``forward`` (and the decorators around it) whose innermost function reads its
    globals from a copy of its module's namespace holding ``ours``."""
    inner = getattr(forward, "__wrapped__", None)
    if inner is None:
        namespace = {**forward.__globals__, **ours}
        return _copy_function(forward, namespace, forward.__closure__)
    new_inner = _rebound_forward(inner, ours)
    cells = list(forward.__closure__ or ())
    hits = [i for i, c in enumerate(cells) if _cell_value(c) is inner]
    if not hits:
        raise RuntimeError(f"cannot rebind {forward.__qualname__}: its decorator does not hold the function it "
                           "wraps in a closure; apply_kernels() process-wide instead")
    for i in hits:
        cells[i] = types.CellType(new_inner)
    new = _copy_function(forward, forward.__globals__, tuple(cells))
    new.__wrapped__ = new_inner
    return new


def _cell_value(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _copy_function(fn: Callable, namespace: dict, closure: tuple | None) -> Callable:
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    new.__dict__.update(fn.__dict__)
    return new


def revert_kernels(model: torch.nn.Module | None = None) -> None:
    """Give HF its functions back: with no model, everything :func:`apply_kernels` did (process-wide
    patches and every patched model); with a model, that model's mixers only. Harmless twice."""
    if model is None:
        for (module, name), fn in list(_ORIGINALS.items()):
            setattr(importlib.import_module(module), name, fn)
        _ORIGINALS.clear()
        mixers = list(_PATCHED_MIXERS)
    else:
        mixers = [m for m in model.modules() if m in _PATCHED_MIXERS]
    for mixer in mixers:
        mixer.__dict__.pop("forward", None)
        _PATCHED_MIXERS.discard(mixer)
