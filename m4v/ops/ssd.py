"""Chunked SSD scan in pure torch: Mamba2 state-space duality (arXiv:2405.21060), which M4V Sec. 3 builds on.

Per head, with state h_t of shape [p, n]::

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,      y_t = h_t C_t + D x_t,      out_t = y_t * silu(z_t)

The sequence is split into chunks of Q steps. Inside a chunk the output is a masked quadratic form
(C B^T weighted by a segment-sum decay mask); chunk states carry the rest across chunks through a
recurrence over chunks, which is itself written as a (small) segment-sum matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m4v.ops.registry import register_ssd_backend, select_ssd_backend

SSDOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _shape_error(name: str, want: str, got: torch.Tensor | None) -> ValueError:
    shape = None if got is None else tuple(got.shape)
    return ValueError(f"{name} must have shape {want}, got {shape}.")


def _check_ssd_args(
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
    """Validate the mamba_chunk_scan_combined-style argument shapes; raise ValueError naming the field."""
    if x.dim() != 4:
        raise _shape_error("x", "[batch, length, heads, headdim]", x)
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise _shape_error("B", f"[{b}, {l}, groups, d_state]", B)
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise ValueError(f"B's groups dimension must divide the number of heads {h}, got {g}.")
    if C.shape != B.shape:
        raise _shape_error("C", f"{list(B.shape)} (same as B)", C)
    if dt.shape != (b, l, h):
        raise _shape_error("dt", f"[{b}, {l}, {h}]", dt)
    if A.shape != (h,):
        raise _shape_error("A", f"[{h}]", A)
    if D is not None and D.shape not in ((h,), (h, p)):
        raise _shape_error("D", f"[{h}] or [{h}, {p}]", D)
    if z is not None and z.shape != x.shape:
        raise _shape_error("z", f"{list(x.shape)} (same as x)", z)
    if dt_bias is not None and dt_bias.shape != (h,):
        raise _shape_error("dt_bias", f"[{h}]", dt_bias)
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise _shape_error("initial_state", f"[{b}, {h}, {p}, {n}]", initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if l < 1:
        raise ValueError("x must have a sequence length of at least 1.")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16/fp16/fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = sum_{k=j+1..i} a[..., k] for j <= i, -inf above the diagonal.

    Built by a cumulative sum of a masked copy rather than a difference of prefix sums, so short segments
    stay accurate when the prefix sums are large. Shape [..., T] -> [..., T, T].
    """
    t = a.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    rows = a.unsqueeze(-1).expand(*a.shape, t).masked_fill(~strict, 0.0)
    out = rows.cumsum(dim=-2)  # cumsum's backward needs no saved tensor, so the fill below may be in place
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill_(~causal, float("-inf"))


def _heads_last(t: torch.Tensor, g: int) -> torch.Tensor:
    """[b, c, h, q] -> [b, c, q, g, r] view-permutation used to scale per-head values in grouped layout."""
    b, c, h, q = t.shape
    return t.view(b, c, g, h // g, q).permute(0, 1, 4, 2, 3)


def ssd_torch(
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
    """Chunked SSD in pure torch (any device/dtype, autograd); :func:`ssd`'s arguments minus ``backend``."""
    _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    cd = _compute_dtype(x)

    xc = x.to(cd)
    dtc = dt.to(cd)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(cd)
    if dt_softplus:
        dtc = F.softplus(dtc)

    q = min(chunk_size, l)
    pad = (-l) % q
    total = l + pad
    nc = total // q
    # Padded steps have dt = 0: no input, decay exp(0) = 1, so outputs and the final state are unchanged.
    xdt = F.pad(xc * dtc.unsqueeze(-1), (0, 0, 0, 0, 0, pad)).view(b, nc, q, g, r, p)
    Bc = F.pad(B.to(cd), (0, 0, 0, 0, 0, pad)).view(b, nc, q, g, n)
    Cc = F.pad(C.to(cd), (0, 0, 0, 0, 0, pad)).view(b, nc, q, g, n)
    a = F.pad(dtc * A.to(cd), (0, 0, 0, pad)).view(b, nc, q, h).transpose(2, 3).contiguous()  # [b, c, h, q]

    a_cum = a.cumsum(dim=-1)  # log decay from the chunk start to step t (inclusive)
    decay = segsum(a).exp_()  # [b, c, h, q, q]: decay from step s to step t within a chunk (in place)

    # 1. Intra-chunk (diagonal blocks): y_t = sum_{s<=t} (C_t . B_s) decay[t, s] dt_s x_s.
    to_end = _heads_last(decay[..., -1, :].contiguous(), g).unsqueeze(-1)  # [b, c, q, g, r, 1]: step 2
    scores = torch.einsum("bcqgn,bcsgn->bcgqs", Cc, Bc)  # shared by the h/g heads of a group
    mixed = scores.unsqueeze(3) * decay.view(b, nc, g, r, q, q)  # contiguous in the einsum's batch order
    del decay  # without autograd this frees the largest tensor before the next one is made
    y = torch.einsum("bcgrqs,bcsgrp->bcqgrp", mixed, xdt)
    del mixed

    # 2. State of each chunk from its own inputs, decayed to the chunk end (last row of the decay mask).
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xdt * to_end).reshape(b, nc, h, p, n)

    # 3. Recurrence over chunks: state entering chunk c, as a segment-sum over chunk-level log decays.
    if initial_state is None:
        init = torch.zeros(b, 1, h, p, n, dtype=cd, device=x.device)
    else:
        init = initial_state.to(cd).unsqueeze(1)
    states = torch.cat([init, states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = segsum(F.pad(a_cum[..., -1].transpose(1, 2), (1, 0))).exp_()  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. Off-diagonal blocks: carried-in state read out by C_t, decayed from the chunk start to t.
    from_start = _heads_last(torch.exp(a_cum), g).unsqueeze(-1)  # [b, c, q, g, r, 1]
    y = y + torch.einsum("bcqgn,bcgrpn->bcqgrp", Cc, entering.view(b, nc, g, r, p, n)) * from_start

    y = y.reshape(b, total, h, p)[:, :l]
    if D is not None:
        Dc = D.to(cd)
        y = y + xc * (Dc.unsqueeze(-1) if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    return (y, final_state) if return_final_state else y


def ssd(
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
    backend: str | None = None,
) -> SSDOutput:
    """SSD scan with mamba_ssm's ``mamba_chunk_scan_combined`` argument convention.

    Args:
        x: [b, l, h, p] inputs. dt: [b, l, h] step sizes. A: [h] (negative) decay rates.
        B, C: [b, l, g, n]; head i uses group i // (h // g).
        D: optional [h] or [h, p] skip, y += D * x. z: optional [b, l, h, p] gate, out = y * silu(z).
        dt_bias: optional [h], added to dt before the optional softplus (``dt_softplus``).
        initial_state: optional [b, h, p, n] state before the first step.
        return_final_state: also return the [b, h, p, n] state after the last step.
        chunk_size: chunk length of the chunked algorithm (does not change the result).
        backend: registered backend name; default: env var M4V_SSD_BACKEND, else the best available.

    Returns:
        y [b, l, h, p] in x's dtype, or (y, final_state) with final_state in float32 (float64 if x is).
    """
    _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    fn = select_ssd_backend(x, backend).fn
    return fn(
        x,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
        chunk_size=chunk_size,
    )


register_ssd_backend("torch", ssd_torch, available=lambda x: True, priority=0)
