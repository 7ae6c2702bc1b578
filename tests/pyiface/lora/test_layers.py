"""LoRA layers: packed linear, LM head and embedding against a float64 per-token loop, gradients
against torch autograd of a float64 gather reference, torch.compile, and the gpu tier (Llama-3-8B
qkv in bf16, CUDA graph replay with new mappings, inductor)."""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from pyiface.lora import LoRABatchWrapper, LoRAEmbedding, LoRALinear, LoRALogits
from tests.pyiface.lora.common import BACKENDS, oracle_delta, random_adapter
from tests.utils import KERNEL_DEVICE, assert_close
from triton_kernels import use_backend

DEV = KERNEL_DEVICE
H_IN, SLICES, MAX_LORAS, MAX_RANK = 13, (9, 3, 3), 4, 8
MAPPING = [2, -1, 0, 2, 3, 3, 0, -1, 2, 1]  # slot 1 stays empty


def _packed_layer(wrapper, trainable=False):
    base = nn.Linear(H_IN, sum(SLICES), device=DEV)
    layer = LoRALinear(base, wrapper, max_rank=MAX_RANK, output_slices=SLICES, trainable=trainable)
    adapters = {0: random_adapter([1, 4, 2], H_IN, SLICES), 2: random_adapter(8, H_IN, SLICES)}
    adapters[3] = random_adapter(5, H_IN, SLICES)
    adapters[3][0][1] = adapters[3][1][1] = None  # adapter 3 leaves the k slice alone
    for slot, adapter in adapters.items():
        layer.set_lora(slot, *adapter)
    return base, layer, adapters


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_linear_matches_loop(backend):
    wrapper = LoRABatchWrapper(MAX_LORAS, 16, DEV)
    base, layer, adapters = _packed_layer(wrapper)
    x = torch.randn(2, 5, H_IN, device=DEV)  # leading dims flatten to the 10 mapped tokens
    wrapper.update_metadata(torch.tensor(MAPPING))
    with use_backend(backend), torch.no_grad():
        y = layer(x)
    flat = x.reshape(10, H_IN).cpu()
    ref = flat.double() @ base.weight.detach().cpu().double().T + base.bias.detach().cpu().double()
    ref += oracle_delta(flat, MAPPING, adapters, SLICES)
    assert y.shape == (2, 5, sum(SLICES))
    assert_close(y.reshape(10, -1), ref.float().to(DEV))


def _gather_reference(x, mapping, a_stacked, b_stacked):
    """float64 LoRA delta by gathering each token's stacked weights (differentiable in all)."""
    slots = torch.tensor(mapping, device=x.device)
    keep = (slots >= 0).to(torch.float64)[:, None]
    idx = slots.clamp_min(0)
    cols = [
        torch.einsum("tnr,trh,th->tn", b.double()[idx], a.double()[idx], x.double()) * keep
        for a, b in zip(a_stacked, b_stacked)
    ]
    return torch.cat(cols, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_autograd(backend):
    wrapper = LoRABatchWrapper(MAX_LORAS, 16, DEV)
    _, layer, _ = _packed_layer(wrapper, trainable=True)
    layer.weight.requires_grad_(False)
    x = torch.randn(10, H_IN, device=DEV, requires_grad=True)
    grad_out = torch.randn(10, sum(SLICES), device=DEV)
    wrapper.update_metadata(torch.tensor(MAPPING))
    with use_backend(backend):
        (layer(x) * grad_out).sum().backward()
    weights = [*layer.slots.lora_a_stacked, *layer.slots.lora_b_stacked]
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    y64 = x64 @ layer.weight.detach().double().T + _gather_reference(x64, MAPPING, w64[:3], w64[3:])
    (y64 * grad_out.double()).sum().backward()
    assert_close(x.grad, x64.grad.float(), name="dx")
    for i, (w, ref) in enumerate(zip(weights, w64)):
        assert_close(w.grad, ref.grad.float(), name=f"d{'AB'[i // 3]}[{i % 3}]")
    assert not weights[0].grad[1].any(), "the empty slot gets no gradient"


def test_no_grad_and_grad_paths_agree():
    wrapper = LoRABatchWrapper(MAX_LORAS, 16, DEV)
    _, layer, _ = _packed_layer(wrapper)
    x = torch.randn(10, H_IN, device=DEV)
    wrapper.update_metadata(torch.tensor(MAPPING))
    with torch.no_grad():
        inference = layer(x)
    training = layer(x.requires_grad_())
    assert training.requires_grad
    assert_close(training.detach(), inference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_embedding_layers(backend):
    vocab, hidden = 21, 6
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, DEV, max_num_samples=2)
    embed = LoRAEmbedding(nn.Embedding(vocab, hidden, device=DEV), wrapper, max_rank=4, trainable=True)
    head = LoRALogits(nn.Linear(hidden, vocab, bias=False, device=DEV), wrapper, max_rank=4)
    emb_a, emb_b, head_adapter = (
        torch.randn(3, vocab),
        torch.randn(hidden, 3),
        random_adapter(2, hidden, (vocab,)),
    )
    embed.set_lora(1, emb_a, emb_b, 0.5)
    head.set_lora(0, *head_adapter)
    ids = torch.randint(0, vocab, (2, 3), device=DEV)
    wrapper.update_metadata(torch.tensor([1, 1, 1, -1, -1, -1]), torch.tensor([0, -1]))
    with use_backend(backend):
        h = embed(ids)
        logits = head(h[:, -1].detach())
    ref_h = embed.weight.detach().double()[ids]
    ref_h[0] += 0.5 * (emb_b.double() @ emb_a.double()[:, ids[0].cpu()]).T.to(DEV)
    assert_close(h, ref_h.float())
    last = h[:, -1].detach().cpu()
    ref_logits = last.double() @ head.weight.detach().cpu().double().T
    ref_logits += oracle_delta(last, [0, -1], {0: head_adapter}, (vocab,))
    assert_close(logits, ref_logits.float().to(DEV))
    # embedding LoRA trains: B's gradient reaches slot 1 only
    with use_backend(backend):
        h.sum().backward()
    grad_b = embed.slots.lora_b_stacked[0].grad
    assert grad_b[1].abs().sum() > 0
    assert not grad_b[[0, 2, 3]].any()


def test_compile_fullgraph_follows_new_mappings():
    """The layer traces whole (no graph break); a new mapping of the same length reuses the graph."""
    torch._dynamo.reset()
    wrapper = LoRABatchWrapper(MAX_LORAS, 16, "cpu")
    _, layer, _ = _packed_layer(wrapper, trainable=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, H_IN)
    for mapping in (MAPPING, MAPPING[::-1], [-1] * 10):
        wrapper.update_metadata(torch.tensor(mapping))
        with torch.no_grad():
            assert_close(compiled(x), layer(x))
    wrapper.update_metadata(torch.tensor(MAPPING))
    x.requires_grad_()
    compiled(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    layer(x).square().sum().backward()
    assert_close(grad, x.grad)


def test_compile_dynamic_token_count_compiles_once():
    """vLLM compiles with a dynamic token dim: steps of new lengths must not recompile."""
    torch._dynamo.reset()
    wrapper = LoRABatchWrapper(MAX_LORAS, 32, "cpu")
    _, layer, _ = _packed_layer(wrapper)
    counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    with torch.no_grad():
        for num_tokens in (10, 6, 13, 29):
            wrapper.update_metadata(torch.randint(-1, MAX_LORAS, (num_tokens,)))
            x = torch.randn(num_tokens, H_IN)
            assert_close(compiled(x), layer(x))
    assert counter.frame_count == 1


def _group_reference(layer: LoRALinear, x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """fp32 on the GPU, one slot at a time (the gather reference would not fit at real sizes)."""
    y = x.float() @ layer.weight.float().T
    for slot in range(layer.slots.max_loras):
        rows = (mapping == slot).nonzero().squeeze(1)
        cols = [
            x[rows].float() @ a[slot].float().T @ b[slot].float().T
            for a, b in zip(layer.slots.lora_a_stacked, layer.slots.lora_b_stacked)
        ]
        y[rows] += torch.cat(cols, 1)
    return y


def _llama_qkv_layer(wrapper, ranks=(8, 16, 64, 8, 64, 16, 8, 64)):
    """Llama-3-8B qkv_proj: 4096 -> 4096 + 1024 + 1024, bf16, adapters of mixed ranks."""
    base = nn.Linear(4096, 6144, bias=False, dtype=torch.bfloat16, device="cuda")
    layer = LoRALinear(base, wrapper, max_rank=64, output_slices=(4096, 1024, 1024))
    for slot, rank in enumerate(ranks):
        a = [torch.randn(rank, 4096, device="cuda") / 64 for _ in range(3)]
        layer.set_lora(slot, a, [torch.randn(n, rank, device="cuda") / 8 for n in (4096, 1024, 1024)], 2.0)
    return layer


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 77, 256])
def test_gpu_llama_qkv_bf16(num_tokens):
    wrapper = LoRABatchWrapper(8, 512, "cuda")
    layer = _llama_qkv_layer(wrapper)
    x = torch.randn(num_tokens, 4096, dtype=torch.bfloat16, device="cuda")
    mapping = torch.randint(-1, 8, (num_tokens,), device="cuda")
    wrapper.update_metadata(mapping)
    with torch.no_grad():
        y = layer(x)
    assert_close(y, _group_reference(layer, x, mapping).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("capture_all_no_lora", [False, True], ids=["capture-with-lora", "capture-all-minus-1"])
def test_gpu_cuda_graph_replays_new_mappings(capture_all_no_lora):
    """Capture once, then replay after each update_metadata with a different mapping: the graph
    reads the refilled buffers. A capture on an all -1 step must still record the launch."""
    num_tokens = 64
    wrapper = LoRABatchWrapper(8, num_tokens, "cuda")
    layer = _llama_qkv_layer(wrapper)
    x = torch.randn(num_tokens, 4096, dtype=torch.bfloat16, device="cuda")
    wrapper.update_metadata(torch.arange(num_tokens, device="cuda") % 8)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up with LoRA tokens: compiles and first-use checks happen outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        if capture_all_no_lora:
            wrapper.update_metadata(torch.full((num_tokens,), -1, device="cuda"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        for mapping in (
            torch.randint(-1, 8, (num_tokens,), device="cuda"),
            torch.full((num_tokens,), 5, device="cuda"),
            torch.full((num_tokens,), -1, device="cuda"),
        ):
            wrapper.update_metadata(mapping)
            graph.replay()
            assert_close(y, _group_reference(layer, x, mapping).bfloat16())


@pytest.mark.gpu
def test_gpu_compile_inductor_and_training():
    wrapper = LoRABatchWrapper(8, 256, "cuda")
    layer = _llama_qkv_layer(wrapper)
    layer.slots.lora_a_0.requires_grad_()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(200, 4096, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    wrapper.update_metadata(torch.randint(-1, 8, (200,), device="cuda"))
    out = compiled(x)
    out.float().square().mean().backward()
    grads = x.grad.clone(), layer.slots.lora_a_0.grad.clone()
    x.grad = layer.slots.lora_a_0.grad = None
    layer(x).float().square().mean().backward()
    assert_close(grads[0], x.grad)
    assert_close(grads[1], layer.slots.lora_a_0.grad)
