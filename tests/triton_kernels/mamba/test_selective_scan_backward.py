"""selective_scan_fn's backward (triton_kernels/mamba/selective_scan_bwd.py, selective_scan_bwd_triton.py): every
backend's gradients against autograd through the float64 sequential oracle (the Triton kernel under the
interpreter, the torch backend, the cpu backend), gradcheck of the torch backend in float64,
determinism, the grouped-dB/dC accumulation across channel blocks, opcheck of ifk::selective_scan_bwd,
torch.compile, activation checkpointing, bad input, HF transformers' MambaForCausalLM gradients and
AdamW steps, and the gpu tier."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.triton_kernels.mamba.scan_inputs import make_batched
from tests.utils import KERNEL_DEVICE, assert_close
from triton_kernels import selective_scan_fn, use_backend
from triton_kernels.mamba import naive as oracle
from triton_kernels.mamba import selective_scan_bwd_triton
from triton_kernels.mamba.selective_scan_bwd import scan_bwd_torch

F32, F16, F64 = torch.float32, torch.float16, torch.float64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Relative error of fp32 gradients against the float64 oracle (norm-wise): the states are recomputed
# in fp32 and a_t h_{t-1} is taken as h_t - b_t in the Triton kernel.
GRAD_TOL = {F32: 2e-5, F16: 5e-3}


def leaves(args: dict) -> dict:
    """``args`` with every tensor a leaf that requires grad (float tensors only)."""
    return {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def tensors(args: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, args[k]) for k in NAMES if args.get(k) is not None]


def oracle_grads(args: dict, dout: torch.Tensor, dlast: torch.Tensor | None) -> dict:
    """Autograd through the float64 sequential oracle."""
    a64 = {k: (v.detach().to(F64).requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, last = oracle.selective_scan(**a64)
    loss = (out * dout.to(F64)).sum() + (0 if dlast is None else (last * dlast.to(F64)).sum())
    named = tensors(a64)
    return dict(zip([k for k, _ in named], torch.autograd.grad(loss, [t for _, t in named])))


def our_grads(args: dict, dout: torch.Tensor, dlast: torch.Tensor | None) -> dict:
    a = leaves(args)
    out, last = selective_scan_fn(**a, return_last_state=True)
    loss = (out.float() * dout).sum() + (0 if dlast is None else (last * dlast).sum())
    named = tensors(a)
    grads = torch.autograd.grad(loss, [t for _, t in named])
    for (k, t), g in zip(named, grads):
        assert g.dtype == t.dtype, k
        assert g.shape == t.shape, k
    return dict(zip([k for k, _ in named], grads))


def assert_grads_close(got: dict, ref: dict, tol: float) -> None:
    assert got.keys() == ref.keys()
    for k in got:
        if ref[k].norm() == 0:  # e.g. dA for one token from a zero state
            assert got[k].abs().max() <= tol, k
        else:
            assert_close(got[k].double(), ref[k], tol, name=f"d{k}")


CASES = [
    pytest.param(dict(bsz=2, dim=5, dstate=4, seqlen=1), {}, id="L1-D5-N4-token"),
    pytest.param(dict(bsz=1, dim=14, dstate=16, seqlen=7, bc="group2"), {}, id="L7-D14-N16-G2"),
    pytest.param(dict(bsz=2, dim=19, dstate=3, seqlen=63), dict(z=False, bias=False), id="L63-D19-N3-noz-nobias"),
    pytest.param(dict(bsz=1, dim=6, dstate=16, seqlen=64, bc="group2"), dict(D=False), id="L64-2tiles-G2-noD"),
    pytest.param(dict(bsz=1, dim=4, dstate=32, seqlen=33), dict(softplus=False), id="L33-N32-tile16-nosoftplus"),
    pytest.param(dict(bsz=1, dim=3, dstate=4, seqlen=300, bc="channel"), dict(D=False, softplus=False),
                 id="L300-D3-perchannelB"),
    pytest.param(dict(bsz=2, dim=8, dstate=5, seqlen=40, dtype=F16), {}, id="L40-fp16"),
]


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
@pytest.mark.parametrize(("shape", "flags"), CASES)
def test_grads_match_oracle(backend, shape, flags):
    args = make_batched(**shape, **flags)
    bsz, dim, seqlen = args["u"].shape
    dout = torch.randn(bsz, dim, seqlen, device=KERNEL_DEVICE)
    dlast = torch.randn(bsz, dim, args["A"].shape[1], device=KERNEL_DEVICE)
    with use_backend(backend):
        got = our_grads(args, dout, dlast)
    ref = oracle_grads(args, dout, dlast)
    assert_grads_close(got, ref, GRAD_TOL[args["u"].dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grads_per_channel_bc_only_last_state(backend):
    """Per-channel B and C (no B/C over tokens at all), the loss on the last state only (dout is zero)."""
    args = make_batched(2, 6, 4, 37, bc="channel")
    args["C"] = torch.randn(6, 4, device=KERNEL_DEVICE)
    dlast = torch.randn(2, 6, 4, device=KERNEL_DEVICE)
    with use_backend(backend):
        a = leaves(args)
        _, last = selective_scan_fn(**a, return_last_state=True)
        named = tensors(a)
        got = dict(zip([k for k, _ in named], torch.autograd.grad((last * dlast).sum(), [t for _, t in named],
                                                                    allow_unused=True)))
    ref = oracle_grads(args, torch.zeros(2, 6, 37, device=KERNEL_DEVICE), dlast)
    got = {k: torch.zeros_like(v) if v is None else v for k, v in got.items()}
    assert_grads_close(got, ref, GRAD_TOL[F32])


@pytest.mark.parametrize("bc", ["token", "group2", "channel"])
def test_gradcheck_torch_backend_float64(bc):
    """The torch backend's backward is the exact gradient of the float64 oracle (finite differences)."""
    args = make_batched(1, 4, 3, 6, bc=bc)
    a64 = {k: (v.detach().to(F64).requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}

    class OracleWithOurBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *xs):
            ctx.save_for_backward(*xs)
            return oracle.selective_scan(*xs, delta_softplus=True)

        @staticmethod
        def backward(ctx, dout, dlast):
            return scan_bwd_torch(dout, dlast, *ctx.saved_tensors, True, chunk_size=4)

    inputs = tuple(a64[k] for k in NAMES)
    assert torch.autograd.gradcheck(OracleWithOurBackward.apply, inputs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_is_deterministic(backend):
    args = make_batched(2, 12, 4, 45, bc="group2")
    dout = torch.randn(2, 12, 45, device=KERNEL_DEVICE)
    with use_backend(backend):
        first, second = our_grads(args, dout, None), our_grads(args, dout, None)
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_triton_grouped_dbc_summed_over_channel_blocks(monkeypatch):
    """Small tiles and one program per group: each program adds several channel blocks' dB/dC into its
    workspace slot (the path real sizes take), and B given per token besides grouped C."""
    monkeypatch.setattr(selective_scan_bwd_triton, "BWD_TILE_ELEMENTS", 64)
    monkeypatch.setattr(selective_scan_bwd_triton, "BWD_PROGRAMS", 1)
    args = make_batched(2, 14, 4, 40, bc="group2")
    assert selective_scan_bwd_triton._bwd_launch_shape(4, 7, 2, 2, False)[4] > 1  # blocks per program
    dout = torch.randn(2, 28, 40, device=KERNEL_DEVICE)[:, ::2]  # non-contiguous dout
    with use_backend("triton"):
        got = our_grads(args, dout, None)
    assert_grads_close(got, oracle_grads(args, dout, None), GRAD_TOL[F32])


def test_triton_backward_after_another_backends_forward():
    """The forward ran on torch (which writes the tile states too), the backward on Triton; and the
    Triton backward without tile states recomputes them with one forward launch."""
    args = make_batched(1, 6, 4, 50)
    dout = torch.randn(1, 6, 50, device=KERNEL_DEVICE)
    a = leaves(args)
    with use_backend("torch"):
        out = selective_scan_fn(**a)
    with use_backend("triton"):
        grads = torch.autograd.grad((out * dout).sum(), [t for _, t in tensors(a)])
    ref = oracle_grads(args, dout, None)
    assert_grads_close(dict(zip(ref, grads)), ref, GRAD_TOL[F32])
    inputs = [args[k] for k in ("u", "delta", "A")] + [args["B"][:, None], args["C"][:, None]] + [
        args[k] for k in ("D", "z", "delta_bias")]
    direct = selective_scan_bwd_triton.scan_bwd_triton(dout, None, *inputs, True, tile_states=None)
    for k, g, r in zip(NAMES, direct, grads):
        assert_close(g.view(r.shape), r.double(), GRAD_TOL[F32], name=f"d{k}")


def _bwd_op_args(args: dict, dout, dlast):
    u, B, C = args["u"], args["B"], args["C"]
    B4, C4 = (M[:, None] if M.dim() == 3 else M for M in (B, C))
    grads = [None if args.get(k) is None else torch.empty_like(v, dtype=F32)
             for k, v in ((k, {**args, "B": B4, "C": C4}.get(k)) for k in NAMES)]
    inputs = [dout, dlast, u, args["delta"], args["A"], B4, C4, args.get("D"), args.get("z"), args.get("delta_bias"),
              None]
    return (*grads, inputs, args["delta_softplus"])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck_backward_op(backend):
    for bc, flags in (("token", {}), ("channel", dict(z=False, D=False, bias=False))):
        args = make_batched(1, 4, 2, 6, bc=bc, **flags)
        dout, dlast = torch.randn(1, 4, 6, device=KERNEL_DEVICE), torch.randn(1, 4, 2, device=KERNEL_DEVICE)
        with use_backend(backend):
            torch.library.opcheck(torch.ops.ifk.selective_scan_bwd.default, _bwd_op_args(args, dout, dlast))


def test_torch_compile_fullgraph_forward_and_backward():
    args = make_batched(1, 6, 4, 20)
    dout = torch.randn(1, 6, 20, device=KERNEL_DEVICE)
    fn = torch.compile(lambda **kw: selective_scan_fn(**kw, return_last_state=True), fullgraph=True)
    a = leaves(args)
    out, last = fn(**a)
    named = tensors(a)
    grads = torch.autograd.grad((out * dout).sum() + last.sum(), [t for _, t in named])
    ref = oracle_grads(args, dout, torch.ones_like(last))
    assert_grads_close(dict(zip([k for k, _ in named], grads)), ref, GRAD_TOL[F32])


def test_activation_checkpointing_gives_the_same_grads():
    args = make_batched(2, 6, 4, 25)
    dout = torch.randn(2, 6, 25, device=KERNEL_DEVICE)
    plain = our_grads(args, dout, None)
    a = leaves(args)
    named = tensors(a)

    def block(*xs):
        return selective_scan_fn(**dict(zip([k for k, _ in named], xs)), delta_softplus=True)

    out = checkpoint(block, *[t for _, t in named], use_reentrant=False)
    grads = torch.autograd.grad((out * dout).sum(), [t for _, t in named])
    for (k, _), g in zip(named, grads):
        assert torch.equal(g, plain[k]), k


def test_bad_input_with_requires_grad_raises_before_running():
    args = leaves(make_batched(1, 4, 2, 5))
    bad = torch.complex(args["A"].detach(), torch.zeros_like(args["A"])).requires_grad_()
    with pytest.raises(TypeError, match="A must be real"):
        selective_scan_fn(**{**args, "A": bad})
    with pytest.raises(TypeError, match="z"):
        selective_scan_fn(**{**args, "z": args["z"].detach().to(torch.complex64).requires_grad_()})


def test_backward_op_rechecks_shapes():
    args = make_batched(1, 4, 2, 6)
    dout, dlast = torch.randn(1, 4, 6), torch.randn(1, 4, 2)
    op = torch.ops.ifk.selective_scan_bwd
    *grads, inputs, sp = _bwd_op_args(args, dout, dlast)
    with pytest.raises(ValueError, match=r"dout must have shape \[1, 4, 6\], got \[1, 4, 5\]"):
        op(*grads, [dout[..., :5], *inputs[1:]], sp)
    with pytest.raises(ValueError, match=r"B must have shape \[1, \*, 2, 6\]"):
        op(*grads, [*inputs[:5], inputs[5][..., :3], *inputs[6:]], sp)
    with pytest.raises(ValueError, match="dD must be given exactly when its input is"):
        op(*grads[:5], None, *grads[6:], inputs, sp)
    with pytest.raises(ValueError, match="tile_states must have shape"):
        op(*grads, [*inputs[:-1], torch.zeros(1, 1, 4, 2)], sp)


# ---- HF transformers: a tiny MambaForCausalLM ------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hf_tiny_mamba_parameter_grads_and_adamw_steps(backend, monkeypatch):
    """Parameter gradients of a tiny random MambaForCausalLM (HF's torch path) vs the same model with
    its mixers on our ops (conv and scan) after one backward (relative error <= 1e-4 per parameter),
    and five AdamW steps on a fixed batch give the same loss curve (relative 1e-4 per step)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from tests.triton_kernels.mamba import hf_mixer

    def make_model():
        torch.manual_seed(0)
        config = transformers.MambaConfig(vocab_size=50, hidden_size=16, state_size=8, num_hidden_layers=2,
                                          conv_kernel=4, expand=2)
        return transformers.MambaForCausalLM(config).to(KERNEL_DEVICE)

    ids = torch.randint(0, 50, (2, 9), device=KERNEL_DEVICE)
    steps = 5 if backend == "torch" or torch.cuda.is_available() else 1  # the interpreter is slow

    def run():
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, first = [], None
        for _ in range(steps):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            if first is None:
                first = {n: p.grad.clone() for n, p in model.named_parameters()}
            losses.append(loss.item())
            opt.step()
        return losses, first

    ref_losses, ref_grads = run()
    monkeypatch.setattr(hf_mixer, "SCAN_BACKEND", backend)
    monkeypatch.setattr(MambaMixer, "forward", hf_mixer.mixer_on_our_ops(types.SimpleNamespace(cache=None)))
    with use_backend(backend):
        losses, grads = run()
    for name, g in ref_grads.items():
        assert_close(grads[name], g, 1e-4, name=f"grad {name}")
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), 1e-4, name="AdamW loss curve")


# ---- gpu tier ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_real_size_bf16_grads_and_determinism():
    """D 2048, N 16, L 2048 bf16: Triton gradients vs the fp32 torch backend on the same inputs
    (bf16 rounding of the inputs only), and bit-identical on a second backward."""
    args = make_batched(1, 2048, 16, 2048, dtype=torch.bfloat16)
    dout = torch.randn(1, 2048, 2048, device="cuda")
    with use_backend("triton"):
        got, again = our_grads(args, dout, None), our_grads(args, dout, None)
    args32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with use_backend("torch"):
        ref = our_grads(args32, dout, None)
    for k in got:
        assert torch.equal(got[k], again[k]), k
        assert_close(got[k].float(), ref[k], 2e-2, name=f"d{k}")


@pytest.mark.gpu
def test_gpu_grouped_fp32_grads_match_oracle_and_compile():
    args = make_batched(2, 768, 16, 1000, bc="group2")
    dout = torch.randn(2, 768, 1000, device="cuda")
    ref = oracle_grads(args, dout, None)
    with use_backend("triton"):
        assert_grads_close(our_grads(args, dout, None), ref, GRAD_TOL[F32])
        fn = torch.compile(selective_scan_fn, fullgraph=True)
        a = leaves(args)
        grads = torch.autograd.grad((fn(**a) * dout).sum(), [t for _, t in tensors(a)])
    assert_grads_close(dict(zip(ref, grads)), ref, GRAD_TOL[F32])
