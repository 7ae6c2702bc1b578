"""The layer classes and repositories through which the ``kernels`` package installs our hooks.

``kernels.kernelize`` replaces the ``forward`` of each hook wrapper (transformers' per-mixer copy of
a ``use_kernel_func_from_hub_with_fallback`` function, or a ``use_kernel_forward_from_hub`` layer)
with the ``forward`` of a layer class loaded from a repository: any object whose ``load()`` returns
that class, so nothing comes from the hub. ``kernels`` accepts a class that is stateless (no
``__init__``, no members beyond ``forward``, ``can_torch_compile`` and ``has_backward``) and whose
``forward`` has as many parameters, of the same kinds, as the hook it replaces: each class here is
built from one function of :mod:`pyiface.integrations._hf_ops`, which mirrors HF's parameters.

Two repositories per hook: ``PER_MODEL`` (installed on one model by ``apply_kernels(model)``, always
ours) and ``PROCESS_WIDE`` (registered for every model transformers kernelizes, ours while
:data:`process_wide` is on, HF's own code once ``revert_kernels()`` turns it off - so a model loaded
in between goes back to HF's path too).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn
from kernels import Mode

from pyiface.integrations._hf_ops import HOOKS, MAMBA2_GATED_NORM, hf_mamba2_gated_norm

# Every mode kernelize may ask for: ours serves them all (differentiable, torch.compile-able).
MODES = (Mode.INFERENCE, Mode.TRAINING, Mode.INFERENCE | Mode.TORCH_COMPILE, Mode.TRAINING | Mode.TORCH_COMPILE)
DEVICES = ("cpu", "cuda")
process_wide = [False]  # a list, so the layer classes read the current value (a guarded global under compile)


def hf_function(wrapper: nn.Module) -> Callable:
    """HF's own function behind a hook wrapper (the ``func`` that ``kernels`` closes over in the
    wrapper class's ``forward``): calling it never re-enters the hook dispatch, eager or compiled."""
    forward = type(wrapper).forward
    return forward.__closure__[forward.__code__.co_freevars.index("func")].cell_contents


def _function_layer(hook: str, route: Callable, gated: bool) -> type[nn.Module]:
    """A stateless layer whose ``forward(self, <HF's parameters>)`` runs ``route`` (HF's function first)."""
    if gated:
        def forward(self, *args, **kwargs):
            hf = hf_function(self)
            return route(hf, *args, **kwargs) if process_wide[0] else hf(*args, **kwargs)
    else:
        def forward(self, *args, **kwargs):
            return route(hf_function(self), *args, **kwargs)
    return _layer_class(f"ifk_{hook}", forward, route)


def _norm_layer(gated: bool) -> type[nn.Module]:
    if gated:
        def forward(self, hidden_states, gate=None):
            if process_wide[0]:
                return hf_mamba2_gated_norm(self, hidden_states, gate)
            return type(self).forward(self, hidden_states, gate)
    else:
        def forward(self, hidden_states, gate=None):
            return hf_mamba2_gated_norm(self, hidden_states, gate)
    return _layer_class(MAMBA2_GATED_NORM, forward, None)


def _layer_class(name: str, forward: Callable, route: Callable | None) -> type[nn.Module]:
    if route is not None:  # HF's parameters, with the wrapper in place of ``hf``
        params = list(inspect.signature(route).parameters.values())[1:]
        forward.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                                   *params])
    forward.__qualname__ = f"{name}.forward"
    return type(name, (nn.Module,), {"forward": forward, "can_torch_compile": True, "has_backward": True,
                                     "__module__": __name__})


class Repository:
    """A ``kernels`` repository holding one of our layer classes (no hub, no network)."""

    def __init__(self, layer: type[nn.Module]):
        self.layer = layer

    def load(self) -> type[nn.Module]:
        return self.layer

    def __str__(self) -> str:
        return f"iface-kernels layer `{self.layer.__name__}`"


def _repositories(gated: bool) -> dict[str, Repository]:
    repos = {hook: Repository(_function_layer(hook, route, gated)) for hook, route in HOOKS.items()}
    repos[MAMBA2_GATED_NORM] = Repository(_norm_layer(gated))
    return repos


PER_MODEL = _repositories(gated=False)
PROCESS_WIDE = _repositories(gated=True)
SERVED = tuple(PER_MODEL)  # every hook name we serve


def mapping(repos: dict[str, Repository], hooks) -> dict:
    """A ``kernels`` mapping: each hook in ``hooks`` -> our repository, on every device and mode."""
    return {hook: {device: dict.fromkeys(MODES, repos[hook]) for device in DEVICES} for hook in hooks}


def ours(forward: object) -> bool:
    """Whether a module's instance ``forward`` (a bound method) is one of our layers'."""
    return getattr(forward, "__func__", None) in _FORWARDS


_FORWARDS = {repo.layer.forward for repos in (PER_MODEL, PROCESS_WIDE) for repo in repos.values()}
