"""Triton GPU backend of the SSD scan (MM-DiM mixer, paper Sec. 3.3): chunked forward and backward kernels.

Same convention as ``m4v.ops.ssd`` (mamba_ssm's mamba_chunk_scan_combined). Per head, with state [p, n]:
h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, out_t = y_t * silu(z_t).
Forward: dt / in-chunk cumsum -> chunk states -> state passing over chunks -> chunk output (D skip and
z gate fused). Backward mirrors it (see m4v/ops/triton_ssd/ and docs/kernels.md). States and all
accumulation are fp32; B / C are read per group, never expanded to heads.
"""

from __future__ import annotations

import functools

import torch

from m4v.ops import eager
from m4v.ops.triton_ssd import launch

SSDOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _maybe(t: torch.Tensor) -> torch.Tensor | None:
    """None for the empty 1-d tensor that stands for "no tensor" in the custom ops' outputs (never None)."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def _forward(
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
    want_final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, final state, dt processed, in-chunk cumsum of dt A, chunk-entering states, pre-gate output).

    The final state is an empty tensor unless ``want_final`` (its copy out of ``states`` is a launch of its own).
    """
    b, l, h, p = x.shape
    n = B.shape[3]
    q = chunk_size
    nc = -(-l // q)
    init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    dtp, acum = launch.dt_forward(dt, dt_bias, A, dt_softplus, q, nc)
    states = torch.empty(b, nc + 1, h, p, n, device=x.device, dtype=torch.float32)
    launch.chunk_states(x, B, dtp, acum, states, 0, q)
    launch.state_forward(states, acum, init, q)
    out, ypre = launch.chunk_scan_forward(x, z, B, C, dtp, acum, states, D, q)
    final = states[:, nc].clone() if want_final else x.new_empty(0)
    return out, final, dtp, acum, states, ypre if ypre is not None else x.new_empty(0)


# Under torch.compile the kernels run inside two torch.library custom ops (forward and backward), so that the
# compiler treats the scan as one opaque node with known output shapes instead of tracing into the Triton
# launches; eager calls run the same functions through an autograd.Function without the ops' dispatch (m4v.ops.eager).
_ssd_fwd = torch.library.custom_op("m4v::ssd_triton_fwd", mutates_args=())(_forward)


@_ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk_size, want_final=True):  # type: ignore[no-untyped-def]
    b, l, h, p = x.shape
    n = B.shape[3]
    nc = -(-l // chunk_size)
    f32 = torch.float32
    dtp = x.new_empty(b, h, nc * chunk_size, dtype=f32)
    final = x.new_empty(b, h, p, n, dtype=f32) if want_final else x.new_empty(0)
    return (x.new_empty(b, l, h, p), final, dtp, torch.empty_like(dtp),
            x.new_empty(b, nc + 1, h, p, n, dtype=f32), x.new_empty(b, l, h, p) if z is not None else x.new_empty(0))


def _backward(
    dout: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dtp: torch.Tensor,
    acum: torch.Tensor,
    states: torch.Tensor,
    ypre: torch.Tensor,
    dt_softplus: bool,
    chunk_size: int,
    has_init: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (x, dt raw, A, B, C, D, z, dt_bias, initial state) in fp32 (x: x's dtype); empty when absent."""
    q = chunk_size
    b, l, h, p = x.shape
    n = B.shape[3]
    nc = dtp.shape[2] // q
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
    d_bias = ddt_raw.sum((0, 1)) if dt_bias is not None else None
    blocks = cols.dd_blocks  # per-block partial dD [b, blocks, h, p]; a D of [h] also sums over p, in one reduction
    dD = None if blocks is None or D is None else blocks.sum((0, 1, 3) if D.dim() == 1 else (0, 1))
    grads = (cols.dx, ddt_raw, dA, cols.db, dC, dD, dz, d_bias, dinit if has_init else None)
    return tuple(x.new_empty(0) if t is None else t for t in grads)  # type: ignore[return-value]


_ssd_bwd = torch.library.custom_op("m4v::ssd_triton_bwd", mutates_args=())(_backward)


@_ssd_bwd.register_fake
def _ssd_bwd_fake(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dtp, acum, states, ypre, dt_softplus, chunk_size,
                  has_init):  # type: ignore[no-untyped-def]  # fmt: skip
    f32 = torch.float32
    b, l, h, p = x.shape
    return (x.new_empty(x.shape), dt.new_empty(dt.shape, dtype=f32), A.new_empty(A.shape, dtype=f32),
            B.new_empty(B.shape, dtype=f32), C.new_empty(C.shape, dtype=f32),
            D.new_empty(D.shape, dtype=f32) if D is not None else x.new_empty(0),
            z.new_empty(z.shape) if z is not None else x.new_empty(0),
            dt_bias.new_empty(dt_bias.shape, dtype=f32) if dt_bias is not None else x.new_empty(0),
            x.new_empty(b, h, p, B.shape[3], dtype=f32) if has_init else x.new_empty(0))


def _ssd_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk_size, *_ = inputs
    _, _, dtp, acum, states, ypre = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, dtp, acum, states, ypre)
    ctx.meta = (dt_softplus, chunk_size, initial_state is not None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (dt, A, B, C, D, dt_bias))
    ctx.set_materialize_grads(False)


def _ssd_backward(ctx, dout, dfinal, *_unused, backward=_ssd_bwd):  # type: ignore[no-untyped-def]
    """Gradients of the forward's inputs (None for the absent and the non-tensor ones), computed by ``backward``:
    the backward custom op, or, in the eager Function, the function it wraps."""
    x, dt, A, B, C, D, z, dt_bias, dtp, acum, states, ypre = ctx.saved_tensors
    dt_softplus, q, has_init = ctx.meta
    if dout is None:
        dout = torch.zeros_like(x)
    grads = backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dtp, acum, states, ypre, dt_softplus, q, has_init)
    dx, ddt, dA, dB, dC, dD, dz, d_bias, dinit = (_maybe(g) for g in grads)
    t_dt, t_A, t_B, t_C, t_D, t_bias = ctx.dtypes
    cast = lambda g, dt_: g if g is None or g.dtype == dt_ else g.to(dt_)  # noqa: E731
    return (dx, cast(ddt, t_dt), cast(dA, t_A), cast(dB, t_B), cast(dC, t_C), cast(dD, t_D), dz,
            cast(d_bias, t_bias), dinit, None, None, None)


torch.library.register_autograd("m4v::ssd_triton_fwd", _ssd_backward, setup_context=_ssd_setup_context)
_ssd_eager = eager.eager_function(_forward, _ssd_setup_context, functools.partial(_ssd_backward, backward=_backward))


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


def _dense(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` contiguous (and of ``dtype``), without a torch call when it already is (host time per call)."""
    if t.is_contiguous() and (dtype is None or t.dtype == dtype):
        return t
    t = t.contiguous()
    return t if dtype is None else t.to(dtype)


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
    # strided views (slices of the fused in_proj output) crashed a kernel on the H100: pass dense tensors.
    # B and C enter the kernels in x's dtype; their gradients come back in their own dtypes (autograd of .to)
    x, dt, B, C = _dense(x), _dense(dt), _dense(B, x.dtype), _dense(C, x.dtype)
    z = _dense(z) if z is not None else None
    args = (x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk_size, return_final_state)
    y, final_state, *_ = eager.call(_ssd_fwd, _ssd_eager, *args)
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
