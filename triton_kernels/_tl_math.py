"""Elementwise math shared by every Triton kernel (fp32 in, fp32 out)."""

import triton
import triton.language as tl


@triton.jit
def log1p(x):
    """``log(1 + x)`` accurate for tiny ``x`` (Goldberg's trick: no libdevice, so the interpreter
    runs it): ``u = 1 + x`` rounds, and ``log(u) * x / (u - 1)`` corrects the rounding."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def softplus(x):
    """``log(1 + exp(x))``, identity above 20 (mamba_ssm's threshold); keeps every digit for very
    negative ``x``, where ``log(1.0 + exp(x))`` rounds to 0 below x = -16."""
    return tl.where(x <= 20.0, log1p(tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def silu(x):
    """``x * sigmoid(x)``."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def silu_grad(x):
    """``d silu(x) / dx = s (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))
