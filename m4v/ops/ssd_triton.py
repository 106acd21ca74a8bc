"""Triton GPU backend of the SSD scan (MM-DiM mixer, paper Sec. 3.3): chunked forward and backward kernels.

Same convention as ``m4v.ops.ssd`` (mamba_ssm's mamba_chunk_scan_combined). Per head, with state [p, n]:
h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, out_t = y_t * silu(z_t).
Forward: dt / in-chunk cumsum -> chunk states -> state passing over chunks -> chunk output (D skip and
z gate fused). Backward mirrors it (see m4v/ops/triton_ssd/ and docs/kernels.md). States and all
accumulation are fp32; B / C are read per group, never expanded to heads.
"""

from __future__ import annotations

import torch

from m4v.ops.triton_ssd import launch

SSDOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _SSDTriton(torch.autograd.Function):
    """Autograd wrapper: forward saves dt/acum and the chunk-entering states; backward runs the kernels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        dt_bias: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        dt_softplus: bool,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, l, h, p = x.shape
        n = B.shape[3]
        q = chunk_size
        nc = -(-l // q)
        Bx = B if B.dtype == x.dtype else B.to(x.dtype)
        Cx = C if C.dtype == x.dtype else C.to(x.dtype)
        init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        dtp, acum = launch.dt_forward(dt, dt_bias, A, dt_softplus, q, nc)
        states = torch.empty(b, nc + 1, h, p, n, device=x.device, dtype=torch.float32)
        launch.chunk_states(x, Bx, dtp, acum, states, 0, q)
        launch.state_forward(states, acum, init, q)
        out, ypre = launch.chunk_scan_forward(x, z, Bx, Cx, dtp, acum, states, D, q)
        ctx.save_for_backward(x, dt, A, Bx, Cx, D, z, dt_bias, dtp, acum, states, ypre)
        ctx.meta = (dt_softplus, q, initial_state is not None, B.dtype, C.dtype)
        ctx.set_materialize_grads(False)
        return out, states[:, nc].clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor | None, dfinal: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, dt, A, B, C, D, z, dt_bias, dtp, acum, states, ypre = ctx.saved_tensors
        dt_softplus, q, has_init, b_dtype, c_dtype = ctx.meta
        b, l, h, p = x.shape
        n = B.shape[3]
        nc = dtp.shape[2] // q
        if dout is None:
            dout = torch.zeros_like(x)
        dz = None
        if z is not None:
            dy, dz = launch.gate_backward(dout, z, ypre)
        else:
            dy = dout if dout.dtype == x.dtype else dout.to(x.dtype)
        dstates = torch.empty(b, nc, h, p, n, device=x.device, dtype=torch.float32)
        launch.chunk_states(dy, C, dtp, acum, dstates, 1, q)
        dfin = None if dfinal is None else dfinal.to(torch.float32).contiguous()
        dinit, e = launch.state_backward(dstates, states, acum, dfin, has_init, q)
        cols = launch.bwd_cols(x, B, C, dy, dtp, acum, dstates, D, q)
        dC, qv = launch.bwd_rows(x, B, C, dy, dtp, acum, states, q)
        ddt_raw, dA = launch.dt_backward(dt, dt_bias, A, dt_softplus, dtp, cols, qv, e, q)
        dx, dB, dD = cols.dx, cols.db, cols.dd
        d_bias = ddt_raw.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
        if dD is not None and D is not None:
            dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)
        return (
            dx,
            ddt_raw.to(dt.dtype),
            dA.to(A.dtype),
            dB.to(b_dtype),
            dC.to(c_dtype),
            dD,
            dz,
            d_bias,
            dinit if has_init else None,
            None,
            None,
        )


def _check(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> None:
    """Raise ValueError naming the first argument with a bad shape, dtype or device."""
    if x.dim() != 4 or x.shape[1] < 1:
        raise ValueError(f"x must have shape [batch, length >= 1, heads, headdim], got {tuple(x.shape)}.")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32 for the triton SSD backend, got {x.dtype}.")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape[2] < 1 or h % B.shape[2] != 0:
        raise ValueError(f"B must have shape [{b}, {l}, groups dividing {h}, d_state], got {tuple(B.shape)}.")
    n = B.shape[3]
    expected = {
        "C": (C, tuple(B.shape)),
        "dt": (dt, (b, l, h)),
        "A": (A, (h,)),
        "z": (z, (b, l, h, p)),
        "dt_bias": (dt_bias, (h,)),
        "initial_state": (initial_state, (b, h, p, n)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}.")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape [{h}] or [{h}, {p}], got {tuple(D.shape)}.")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_state", initial_state)):  # fmt: skip
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16:
        raise ValueError(f"chunk_size must be a power of two >= 16 for the triton SSD backend, got {chunk_size!r}.")
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the triton SSD backend, got {chunk_size}.")


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 256,
) -> SSDOutput:
    """Chunked SSD scan in Triton; arguments and result as :func:`m4v.ops.ssd` (final state fp32)."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    # strided views (slices of the fused in_proj output) crashed a kernel on the H100: pass dense tensors
    x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    y, final_state = _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk_size)
    return (y, final_state) if return_final_state else y


def triton_available(x: torch.Tensor) -> bool:
    """Auto-dispatch predicate: CUDA tensors of a supported dtype."""
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES


try:
    from m4v.ops.registry import register_ssd_backend
except ImportError:  # registry not present (stand-alone use of this module)
    pass
else:
    register_ssd_backend("triton", ssd_triton, available=triton_available, priority=10)
