"""peft's mixed-adapter LoRA batches on :func:`triton_kernels.add_lora_linear`.

``peft_model(x, adapter_names=[...])`` runs, in every ``lora.Linear``, ``_mixed_batch_forward``:
a Python loop over the distinct adapters of the batch, each gathering its rows, two matmuls and a
scatter-add. :func:`apply_kernels` gives each ``lora.Linear`` of the model a
``_mixed_batch_forward`` that adds the deltas of all adapters in one ``add_lora_linear`` call
(each adapter at its own rank and scaling; ``"__base__"`` rows get none), reading the adapters
from stacked slots (:class:`pyiface.LoRASlots`) rebuilt whenever an adapter's weights change.

peft's own loop still runs where a gradient must reach the adapters (the op is inference-only),
for active dropout (a layer in training mode) and for embedding/conv LoRA layers.
"""

from __future__ import annotations

from collections.abc import Callable

import peft
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear

from pyiface.lora import LoRASlots
from triton_kernels import LoRAKernelMeta, add_lora_linear
from triton_kernels._data_checks import version_key

_ATTR = "_ifk_lora"  # the per-layer state of a patched layer


class _Adapters:
    """The adapters of one peft model as slots: ``slot(name)`` is stable while the model lives;
    ``meta`` maps a batch's rows to slots, prepared once per batch and shared by every layer."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        self.peft_config = peft_model.peft_config
        self.slots: dict[str, int] = {name: i for i, name in enumerate(self.peft_config)}
        self._key: tuple | None = None
        self._meta: LoRAKernelMeta | None = None

    def slot(self, name: str) -> int:
        if name not in self.slots and name in self.peft_config:  # an adapter added after apply_kernels
            self.slots[name] = len(self.slots)
        return self.slots.get(name, -1)

    def meta(self, adapter_names: list[str], tokens_per_row: int, device: torch.device) -> LoRAKernelMeta:
        for name in self.peft_config:  # give adapters added since the last batch their slots first
            self.slot(name)
        key = (tuple(adapter_names), tokens_per_row, device, len(self.slots))
        if key != self._key:
            rows = torch.tensor([self.slot(n) for n in adapter_names], dtype=torch.int32)
            mapping = rows.repeat_interleave(tokens_per_row)
            meta = LoRAKernelMeta.make(max(len(self.slots), 1), mapping.shape[0], device)
            meta.prepare_tensors(mapping)
            self._key, self._meta = key, meta
        return self._meta


class _LayerKernels:
    """One ``lora.Linear``: its adapters stacked in :class:`LoRASlots`, and the fast forward."""

    def __init__(self, layer: LoraLinear, adapters: _Adapters, original: Callable) -> None:
        self.layer, self.adapters, self.original = layer, adapters, original
        self._key: tuple | None = None
        self._slots: LoRASlots | None = None

    def stacked(self, dtype: torch.dtype, device: torch.device) -> LoRASlots:
        """The slots, rebuilt when an adapter was added, removed, retrained or rescaled (seen by
        version counter; weights that are inference tensors, which have none, are restacked on
        every call)."""
        layer = self.layer
        names = [n for n in layer.lora_A if n in self.adapters.peft_config]
        key = (dtype, device, len(self.adapters.slots), *(
            (n, self.adapters.slot(n), layer.scaling[n], *(
                (id(w), version_key(w)) for w in (layer.lora_A[n].weight, layer.lora_B[n].weight)))
            for n in names))
        if key != self._key:
            slots = LoRASlots(max(len(self.adapters.slots), 1), max([layer.r[n] for n in names], default=1),
                              layer.in_features, (layer.out_features,), dtype=dtype, device=device)
            for n in names:
                slots.set_lora(self.adapters.slot(n), layer.lora_A[n].weight.detach(),
                               layer.lora_B[n].weight.detach(), layer.scaling[n])
            self._key, self._slots = key, slots
        return self._slots

    def needs_peft(self, x: torch.Tensor, kwargs: dict) -> bool:
        """True where peft's loop must run: gradients to track, active dropout, aLoRA offsets."""
        layer = self.layer
        if kwargs.get("alora_offsets") is not None:
            return True
        if layer.training and any(not isinstance(d, torch.nn.Identity) for d in layer.lora_dropout.values()):
            return True
        params = (p for n in layer.lora_A for p in (layer.lora_A[n].weight, layer.lora_B[n].weight))
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """peft's ``_mixed_batch_forward``: ``base_layer(x) + delta`` with x ``[B, ..., H_in]`` and
        ``adapter_names`` one name per row of x (``"__base__"`` = no adapter)."""
        if self.needs_peft(x, kwargs):
            return self.original(x, *args, adapter_names=adapter_names, **kwargs)
        kwargs.pop("alora_offsets", None)
        result = self.layer.base_layer(x, *args, **kwargs)
        if x.numel() == 0:
            return result
        layer = self.layer
        xs = x.reshape(-1, layer.in_features)
        meta = self.adapters.meta(adapter_names, xs.shape[0] // x.shape[0], x.device)
        slots = self.stacked(result.dtype, result.device)
        in_place = result.is_contiguous()
        y = result.view(-1, layer.out_features) if in_place else torch.zeros(
            xs.shape[0], layer.out_features, dtype=result.dtype, device=result.device)
        add_lora_linear(y, xs.to(result.dtype), slots.lora_a_stacked, slots.lora_b_stacked, 1.0,
                        slots.output_slices, meta, lora_ranks=slots.lora_ranks)
        return result if in_place else result + y.view_as(result)


def _check(peft_model: torch.nn.Module) -> list[tuple[str, LoraLinear]]:
    """The model's ``lora.Linear`` layers; raises (nothing patched) for anything not plain LoRA."""
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    for name, config in peft_model.peft_config.items():
        if config.peft_type != peft.PeftType.LORA:
            raise ValueError(f"adapter {name!r} is {config.peft_type.value}, not LoRA; nothing patched")
    linears = []
    for path, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        dora = {name for name, used in module.use_dora.items() if used}
        variants = sorted(dora | set(module.lora_variant))
        if variants:
            kind = "DoRA" if variants[0] in dora else type(module.lora_variant[variants[0]]).__name__
            raise ValueError(f"{path}: adapter {variants[0]!r} is a LoRA variant ({kind}), which "
                             "add_lora_linear does not compute; nothing patched")
        biased = [name for name, used in module.lora_bias.items() if used]
        if biased:
            raise ValueError(f"{path}: adapter {biased[0]!r} has lora_bias=True, which add_lora_linear "
                             "does not compute; nothing patched")
        if isinstance(module, LoraLinear):
            linears.append((path, module))
    if not linears:
        raise ValueError(f"{type(peft_model.base_model.model).__name__} has no peft lora.Linear layer; nothing patched")
    return linears


def apply_kernels(peft_model: peft.PeftModel) -> list[str]:
    """Make every ``lora.Linear`` of ``peft_model`` compute mixed-adapter batches with one
    :func:`~triton_kernels.add_lora_linear` call. Returns the patched module paths.

    Raises ``TypeError`` for a non-peft model and ``ValueError`` (patching nothing) for adapters
    that are not plain LoRA (another peft method, DoRA and other LoRA variants, ``lora_bias``).
    Calling it twice is harmless; adapters added or retrained later are picked up.

    Example:
        >>> model = peft.get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), "a")
        >>> model.add_adapter("b", LoraConfig(r=8, target_modules=["q_proj"]))
        >>> apply_kernels(model)
        ['base_model.model.q_proj']
        >>> with torch.no_grad():
        ...     logits = model(ids, adapter_names=["a", "__base__", "b"])
    """
    linears = _check(peft_model)
    revert_kernels(peft_model)
    adapters = _Adapters(peft_model)
    for _, layer in linears:
        state = _LayerKernels(layer, adapters, layer._mixed_batch_forward)
        setattr(layer, _ATTR, state)
        layer._mixed_batch_forward = state.forward  # peft calls self._mixed_batch_forward(x, ...)
    return [path for path, _ in linears]


def revert_kernels(peft_model: torch.nn.Module) -> None:
    """Give every patched layer of ``peft_model`` peft's own ``_mixed_batch_forward`` back."""
    for module in peft_model.modules():
        if _ATTR in module.__dict__:
            del module.__dict__[_ATTR]
            module.__dict__.pop("_mixed_batch_forward", None)
