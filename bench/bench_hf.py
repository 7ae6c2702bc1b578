"""End-to-end HF benchmarks: ``generate`` of random-initialised Mamba and Mamba-2 models with and
without :func:`pyiface.integrations.transformers.apply_kernels`, and peft mixed-adapter batches with
and without :func:`pyiface.integrations.peft.apply_kernels`.

Cases (full / ``--quick``):
- ``mamba130m-prefill-L1024``: ``generate(prompt of 1024 tokens, max_new_tokens=1)`` on a
  130M-shaped Mamba (d_model 768, 24 layers, vocab 50280, state 16), batch 1: the prefill (scan,
  conv, the cache filled) plus one LM head. ``extra["tokens_per_s"]`` counts prompt tokens.
- ``mamba130m-decode-b{1,16}``: ``generate(8-token prompt, 32 new tokens)``; tokens per second
  count generated tokens (the 8-token prefill is included in the time, a few percent).
- ``mamba2-130m-prefill-L1024`` / ``mamba2-130m-decode-b{1,16}``: the same on a 130M-shaped
  Mamba-2 (d_model 768, 24 layers, 24 heads of 64, state 128, 1 group, chunk 256).
- ``peft-8adapters-b16``: one forward of a small random Llama (hidden 512, 4 layers, q/k/v/o and
  MLP targets) with 8 LoRA adapters of ranks 8..64 over a batch of 16 rows of 32 tokens, every
  row naming an adapter (two ``"__base__"``), and the same with one token a row (decode-shaped);
  each also for one ``lora.Linear`` layer alone, beside that layer's base matmul (the floor).
- ``lfm2-350m-prefill-L1024`` / ``lfm2-350m-decode-b{1,16}``: the same on an LFM2-350M-shaped hybrid
  (d_model 1024, 16 layers: 10 short convs of width 3, 6 attention layers), whose conv runs ours.
- Every row first runs once under the profiler: ours must have run ``ifk::`` ops (listed in
  ``extra["ifk_ops"]``), HF's none; otherwise the family raises instead of printing a row.
- ``--quick``: the same cases on d_model 128 x 2 layer models (prefill 32, 2 new tokens, batch 1)
  and a hidden 128 x 2 layer Llama, decode-shaped only (one token a row).

End-to-end generate runs one input set (K=1): a prompt is tiny next to the weights, which every
call reads anyway. Bytes are the weights read once per forward (the floor for decode). Our rows
carry, in ``extra["profile"]``, the top ops by self CPU time of one run (where the remaining time goes).
"""

from __future__ import annotations

import copy

import torch

from bench.harness import Context, Row

FAMILY = "hf"
FULL = {"hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280}
QUICK = {"hidden_size": 128, "num_hidden_layers": 2, "vocab_size": 1024}
MAMBA2_HEADS = {"head_dim": 64, "n_groups": 1, "conv_kernel": 4, "expand": 2}  # mamba2-130m
PEFT_RANKS = (8, 16, 32, 64, 8, 16, 32, 64)
DECODE_TOKENS = 32
# LFM2-350M's shape: 16 layers, 10 short-conv (width 3) and 6 attention (16 heads, 8 KV heads)
LFM2_FULL = {"hidden_size": 1024, "intermediate_size": 6656, "num_hidden_layers": 16, "vocab_size": 65536,
             "num_attention_heads": 16, "num_key_value_heads": 8,
             "layer_types": ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)]}
LFM2_QUICK = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 1024,
              "num_attention_heads": 2, "num_key_value_heads": 1, "layer_types": ["conv", "full_attention"]}


def _profile(fn, top: int = 8) -> tuple[list[tuple[str, float, float]], set[str]]:
    """(op, self CPU ms, % of the total self time) of one call of ``fn``, largest first, and the names
    of the ``ifk::`` ops that ran in it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ours = {e.key for e in events if e.key.startswith("ifk::")}
    return [(e.key, e.self_cpu_time_total / 1e3, 100.0 * e.self_cpu_time_total / total) for e in ranked], ours


def _check_route(case: str, impl: str, ours: set[str], patched: bool) -> None:
    """Refuse a row that would time HF against HF (or ours against ours)."""
    if patched and not ours:
        raise RuntimeError(f"{case} {impl}: no ifk:: op ran in the timed call; apply_kernels did not reach the model")
    if not patched and ours:
        raise RuntimeError(f"{case} {impl}: the baseline ran {sorted(ours)}")


def _param_bytes(model: torch.nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def _model(ctx: Context, kind: str):
    """A random-initialised 130M-shaped (``--quick``: d_model 128 x 2) Mamba or Mamba-2 LM, eval mode."""
    import transformers as hf

    shape = QUICK if ctx.quick else FULL
    ids = {"pad_token_id": 0, "eos_token_id": None}
    if kind == "mamba":
        config = hf.MambaConfig(**shape, state_size=16, expand=2, conv_kernel=4, **ids)
        cls = hf.MambaForCausalLM
    elif kind == "lfm2":
        shape = LFM2_QUICK if ctx.quick else LFM2_FULL
        config = hf.Lfm2Config(**shape, **ids)
        cls = hf.Lfm2ForCausalLM
    else:
        heads = 2 * shape["hidden_size"] // MAMBA2_HEADS["head_dim"]
        config = hf.Mamba2Config(**shape, **MAMBA2_HEADS, num_heads=heads, state_size=32 if ctx.quick else 128,
                                 chunk_size=64 if ctx.quick else 256, **ids)
        cls = hf.Mamba2ForCausalLM
    torch.manual_seed(0)
    return cls(config).eval().to(ctx.device)


def _generate(model, new_tokens):
    def run(ids):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)

    return run


def mamba_rows(ctx: Context, kind: str) -> list[Row]:
    """Prefill and decode rows of ``kind`` ("mamba", "mamba2" or "lfm2"): HF's path, then ours; each row
    checked with the profiler to have run (ours) or not run (HF's) our ops."""
    from pyiface.integrations.transformers import apply_kernels

    hf = _model(ctx, kind)
    ours = copy.deepcopy(hf)
    apply_kernels(ours)
    name = f"{kind}-d128x2" if ctx.quick else {"mamba": "mamba130m", "mamba2": "mamba2-130m", "lfm2": "lfm2-350m"}[kind]
    prompt_len, new = (32, 2) if ctx.quick else (1024, DECODE_TOKENS)
    gen = torch.Generator().manual_seed(0)
    cases = [(f"{name}-prefill-L{prompt_len}", 1, prompt_len, 1, prompt_len)]
    cases += [(f"{name}-decode-b{b}", b, 8, new, b * new) for b in ((1,) if ctx.quick else (1, 16))]
    rows = []
    for case, batch, length, new_tokens, counted in cases:
        sets = [torch.randint(1, hf.config.vocab_size, (batch, length), generator=gen).to(ctx.device)]
        for impl, model in (("ours[apply_kernels]", ours), ("HF torch path", hf)):
            run = _generate(model, new_tokens)
            profile, ran = _profile(lambda run=run, sets=sets: run(sets[0]))
            _check_route(case, impl, ran, patched=model is ours)
            row = ctx.row(FAMILY, case, impl, run, sets, _param_bytes(model), rates={"tokens_per_s": counted})
            if model is ours:
                row.extra["profile"], row.extra["ifk_ops"] = profile, sorted(ran)
            rows.append(row)
    return rows


def _peft_model(ctx: Context):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (128, 2) if ctx.quick else (512, 4)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0)
    torch.manual_seed(0)
    model = None
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, rank in enumerate(PEFT_RANKS):
        lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(LlamaForCausalLM(config).eval(), lora, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", lora)
    return model.eval().to(ctx.device)


def _peft_cases(ctx: Context, model, length: int):
    """(case, fn, input sets, bytes) of one mixed batch of 16 rows x ``length`` tokens: the whole model,
    one ``lora.Linear`` (up_proj: base matmul + LoRA), and that layer's base matmul alone (the floor).
    One input set each: the weights, which every call reads, dwarf the inputs."""
    rows = 16
    names = [f"a{i % len(PEFT_RANKS)}" for i in range(rows - 2)] + ["__base__"] * 2
    ids = torch.randint(1, 1024, (rows, length), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(rows, length, layer.in_features, device=ctx.device)

    def forward(ids):
        with torch.no_grad():
            return model(ids, adapter_names=names).logits

    def one_layer(x):
        with torch.no_grad():
            return layer._mixed_batch_forward(x, adapter_names=names)

    def base_only(x):
        with torch.no_grad():
            return layer.base_layer(x)

    tag = f"8adapters-b{rows}-L{length}"
    return [(f"peft-{tag}", forward, [ids], _param_bytes(model)),
            (f"peft-up_proj-{tag}", one_layer, [x], _param_bytes(layer)),
            (f"peft-up_proj-{tag}", base_only, [x], _param_bytes(layer.base_layer))]


def peft_rows(ctx: Context) -> list[Row]:
    """peft's loop on one model, ours on a copy with :func:`apply_kernels`, so that the rows of a case
    are timed together (interleaved); the base layer alone beside them."""
    from pyiface.integrations.peft import apply_kernels

    loop = _peft_model(ctx)
    ours = copy.deepcopy(loop)
    apply_kernels(ours)
    lengths = (1,) if ctx.quick else (1, 32)  # decode-shaped (one token a row) and prefill-shaped
    out = []
    for length in lengths:
        for (case, fn, sets, nbytes), (_, ours_fn, ours_sets, _) in zip(_peft_cases(ctx, loop, length),
                                                                      _peft_cases(ctx, ours, length)):
            if fn.__name__ == "base_only":
                out.append(ctx.row(FAMILY, case, "base layer alone (no LoRA)", fn, sets, nbytes))
                continue
            out.append(ctx.row(FAMILY, case, "peft loop", fn, sets, nbytes))
            row = ctx.row(FAMILY, case, "ours[add_lora_linear]", ours_fn, ours_sets, nbytes)
            row.extra["profile"] = _profile(lambda fn=ours_fn, sets=ours_sets: fn(sets[0]))[0]
            out.append(row)
    return out


def run(ctx: Context) -> list[Row]:
    rows = mamba_rows(ctx, "mamba") + mamba_rows(ctx, "mamba2") + mamba_rows(ctx, "lfm2") + peft_rows(ctx)
    for row in rows:
        if "profile" in row.extra:
            top = ", ".join(f"{name} {pct:.0f}%" for name, _, pct in row.extra["profile"][:6])
            ctx.progress(f"profile {row.case} {row.impl}: {top}")
    return rows
