"""Put LoRA layers into a model and load whole adapters into their slots by module name.

:func:`apply_lora` swaps a model's ``nn.Linear`` (and, when targeted, ``nn.Embedding``) modules
for LoRA layers, following the model's ``packed_modules_mapping`` (``SupportsLoRA``), e.g.
``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``: the packed ``qkv_proj`` gets one output slice
per sub-module, and adapters address the slices by the sub-module names
(``layers.0.attn.q_proj``), as peft names them on the unpacked model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from pyiface.lora.layers import LoRAEmbedding, LoRALinear
from pyiface.lora.wrapper import LoRABatchWrapper

AdapterWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""Per module name: ``(lora_a [r, H_in], lora_b [H_out, r])`` as peft stores them."""

LoRALayer = LoRALinear | LoRAEmbedding


class LoRAModules(Mapping[str, tuple[LoRALayer, int]]):
    """Adapter module name -> ``(LoRA layer, output slice)``; loads adapters all-or-nothing."""

    def __init__(self, entries: dict[str, tuple[LoRALayer, int]]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> tuple[LoRALayer, int]:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def layers(self) -> list[LoRALayer]:
        """Each LoRA layer once (a packed layer has several names)."""
        return list(dict.fromkeys(layer for layer, _ in self._entries.values()))

    def set_lora(
        self, slot: int, weights: AdapterWeights, scaling: float | Mapping[str, float] = 1.0
    ) -> None:
        """Load an adapter into ``slot`` of every layer; layers it does not name get zero.

        Args:
            slot: the slot, ``0 <= slot < max_loras``.
            weights: module name -> ``(lora_a, lora_b)`` (see :func:`peft_lora_weights`).
            scaling: one factor for all, or per module name (missing names: 1.0).

        Every layer is validated before any is written: on error nothing changes.
        """
        unknown = sorted(set(weights) - set(self._entries))
        if unknown:
            raise ValueError(
                f"weights name modules without LoRA layers: {unknown[:5]}; known: {sorted(self)[:5]}..."
            )
        per_name = scaling if isinstance(scaling, Mapping) else dict.fromkeys(weights, scaling)
        plan: dict[LoRALayer, tuple[list, list, list]] = {
            layer: ([None] * n, [None] * n, [1.0] * n)
            for layer in self.layers
            for n in [len(layer.slots.output_slices)]
        }
        for name, pair in weights.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    f"weights[{name!r}] must be a (lora_a, lora_b) pair, got {type(pair).__name__}"
                )
            layer, s = self._entries[name]
            plan[layer][0][s], plan[layer][1][s] = pair
            plan[layer][2][s] = per_name.get(name, 1.0)
        prepared = []
        for layer, (a, b, sc) in plan.items():
            try:
                prepared.append(layer.slots.prepare(slot, a, b, sc))
            except (TypeError, ValueError) as err:
                names = [name for name, (other, _) in self._entries.items() if other is layer]
                raise type(err)(f"{' / '.join(names)}: {err}") from err
        for p in prepared:
            p.slots.commit(p)

    def reset_lora(self, slot: int) -> None:
        """Empty ``slot`` in every layer."""
        for layer in self.layers:
            layer.slots.reset_lora(slot)


def _slice_widths(
    name: str, module: nn.Linear, subs: Sequence[str], widths: Sequence[int] | None
) -> tuple[int, ...] | None:
    """Output slice widths of a (packed) linear: given, its ``output_sizes``, or an even split."""
    if len(subs) == 1:
        return None
    widths = getattr(module, "output_sizes", None) if widths is None else widths
    if widths is None:
        if module.out_features % len(subs):
            raise ValueError(
                f"{name}: out_features={module.out_features} does not split evenly into {list(subs)}; "
                "pass output_slices={name: (...)} or give the module an output_sizes attribute"
            )
        widths = [module.out_features // len(subs)] * len(subs)
    if len(widths) != len(subs):
        raise ValueError(
            f"{name}: {len(widths)} output slice widths for {len(subs)} packed modules {list(subs)}"
        )
    return tuple(widths)


def apply_lora(
    model: nn.Module,
    wrapper: LoRABatchWrapper,
    *,
    max_rank: int,
    target_modules: Sequence[str] | None = None,
    packed_modules_mapping: Mapping[str, Sequence[str]] | None = None,
    output_slices: Mapping[str, Sequence[int]] | None = None,
    trainable: bool = False,
) -> LoRAModules:
    """Replace ``model``'s linear layers by LoRA layers, in place; return their name table.

    Args:
        model: any ``nn.Module``; its ``packed_modules_mapping`` attribute is used unless one is
            passed.
        wrapper: the shared :class:`LoRABatchWrapper` (its ``max_loras`` sizes every layer).
        max_rank: the largest adapter rank.
        target_modules: last-name components to adapt (peft's ``target_modules``); a packed
            module is adapted when any of its sub-modules is named. ``None``: every
            ``nn.Linear``. An ``nn.Embedding`` is adapted only when named here.
        packed_modules_mapping: packed module -> its sub-modules, in output order.
        output_slices: packed module's full name (or last name) -> slice widths, for modules
            without an ``output_sizes`` attribute whose slices differ in width (GQA qkv).
        trainable: stacked adapter weights as parameters.

    Raises ``ValueError`` before changing the model when a target or a slice split is wrong.
    Returns a :class:`LoRAModules` whose names are the unpacked module paths (a packed
    ``layers.0.qkv_proj`` gives ``layers.0.q_proj``, ``layers.0.k_proj``, ``layers.0.v_proj``).
    """
    packed = dict(
        getattr(model, "packed_modules_mapping", {})
        if packed_modules_mapping is None
        else packed_modules_mapping
    )
    targets = None if target_modules is None else set(target_modules)
    given = dict(output_slices or {})
    entries: dict[str, tuple[LoRALayer, int]] = {}
    replacements: list[tuple[str, str, LoRALayer]] = []
    matched: set[str] = set()
    for name, module in list(model.named_modules()):
        prefix, _, leaf = name.rpartition(".")
        subs = list(packed.get(leaf, [leaf]))
        hit = {leaf, *subs} & targets if targets is not None else {leaf}
        if isinstance(module, nn.Linear) and hit:
            widths = _slice_widths(name, module, subs, given.get(name, given.get(leaf)))
            layer = LoRALinear(module, wrapper, max_rank=max_rank, output_slices=widths, trainable=trainable)
        elif isinstance(module, nn.Embedding) and targets is not None and leaf in targets:
            layer = LoRAEmbedding(module, wrapper, max_rank=max_rank, trainable=trainable)
        else:
            continue
        matched |= hit
        replacements.append((prefix, leaf, layer))
        for s, sub in enumerate(subs):
            entries[f"{prefix}.{sub}" if prefix else sub] = (layer, s)
    missing = sorted(targets - matched) if targets is not None else []
    if missing:
        raise ValueError(f"target_modules {missing} match no nn.Linear / nn.Embedding of the model")
    for prefix, leaf, layer in replacements:  # only once everything was checked
        setattr(model.get_submodule(prefix), leaf, layer)
    return LoRAModules(entries)


def peft_lora_weights(peft_model: nn.Module, adapter_name: str) -> tuple[dict, dict]:
    """``(weights, scaling)`` of one adapter of a peft ``LoraModel``, keyed by module path.

    Reads ``lora_A/lora_B`` (linear) and ``lora_embedding_A/B`` (embedding) of every peft LoRA
    layer holding ``adapter_name``; the ``base_model.model.`` prefix is dropped so the names
    match the wrapped model's. Feed the result to :meth:`LoRAModules.set_lora`. DoRA and other
    LoRA variants are refused (they are not plain low-rank updates).
    """
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scaling: dict[str, float] = {}
    for name, module in peft_model.named_modules():
        key = name.removeprefix("base_model.model.")
        if adapter_name in getattr(module, "lora_A", {}):
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        elif adapter_name in getattr(module, "lora_embedding_A", {}):
            a, b = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
        else:
            continue
        if getattr(module, "use_dora", {}).get(adapter_name, False) or adapter_name in getattr(
            module, "lora_variant", {}
        ):
            raise ValueError(f"{key}: adapter {adapter_name!r} is a LoRA variant (e.g. DoRA), not supported")
        weights[key] = (a.detach(), b.detach())
        scaling[key] = float(module.scaling[adapter_name])
    if not weights:
        raise ValueError(f"no LoRA layer of the model holds adapter {adapter_name!r}")
    return weights, scaling
