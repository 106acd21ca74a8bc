"""Tests for the chunked SSD scan (m4v.ops.ssd) against a sequential float64 recurrence, and its registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m4v.ops as ops
from m4v.ops import registry
from m4v.ops.ssd import segsum

F64 = torch.float64


def sequential_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None):
    """Independent reference: a python loop over time, float64, per-head B/C by explicit group lookup."""
    x, dt, A, B, C = (t.to(F64) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = h // g
    if dt_bias is not None:
        dt = dt + dt_bias.to(F64)
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    group_of = torch.tensor([i // heads_per_group for i in range(h)])
    state = torch.zeros(b, h, p, n, dtype=F64) if initial_state is None else initial_state.to(F64).clone()
    ys = []
    for t in range(l):
        bt = B[:, t, group_of]  # [b, h, n]
        ct = C[:, t, group_of]
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        state = decay[:, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * bt[:, :, None, :]
        yt = (state * ct[:, :, None, :]).sum(-1)  # [b, h, p]
        if D is not None:
            Dv = D.to(F64)
            yt = yt + (Dv[:, None] if Dv.dim() == 1 else Dv) * x[:, t]
        ys.append(yt)
    y = torch.stack(ys, dim=1)
    if z is not None:
        zz = z.to(F64)
        y = y * zz * torch.sigmoid(zz)
    return y, state


def make_inputs(b, l, h, p, g, n, *, dtype=F64, seed=0, D=None, z=False, dt_bias=False, init=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    args = dict(
        x=rnd(b, l, h, p),
        dt=torch.rand(b, l, h, generator=gen, dtype=F64) * 0.5 + 0.05,
        A=-(torch.rand(h, generator=gen, dtype=F64) * 2 + 0.1),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
    )
    if D == "h":
        args["D"] = rnd(h)
    elif D == "hp":
        args["D"] = rnd(h, p)
    if z:
        args["z"] = rnd(b, l, h, p)
    if dt_bias:
        args["dt"] = rnd(b, l, h)  # raw pre-activation values
        args["dt_bias"] = rnd(h) * 0.5 - 1.0
    if init:
        args["initial_state"] = rnd(b, h, p, n)
    return {k: v.to(dtype) for k, v in args.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm()).item()


CASES = [
    # (b, l, h, p, g, n, chunk, options)
    (2, 37, 4, 3, 1, 5, 16, {}),
    (2, 37, 4, 3, 2, 5, 16, {}),
    (1, 40, 6, 2, 3, 4, 8, {"D": "h"}),
    (2, 33, 4, 3, 2, 5, 16, {"D": "hp", "z": True}),
    (1, 29, 4, 2, 4, 3, 7, {"dt_bias": True, "dt_softplus": True}),
    (2, 37, 4, 3, 2, 5, 16, {"init": True}),
    (2, 21, 4, 3, 2, 5, 64, {"D": "hp", "z": True, "dt_bias": True, "dt_softplus": True, "init": True}),
    (2, 1, 4, 3, 2, 5, 16, {"D": "h", "init": True}),
    (1, 1, 2, 2, 1, 2, 1, {}),
    (1, 19, 2, 3, 1, 4, 1, {"init": True}),
    (1, 300, 2, 4, 1, 6, 16, {"D": "h", "init": True}),  # many chunks: inter-chunk recurrence
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_sequential_float64(case):
    b, l, h, p, g, n, chunk, opts = case
    opts = dict(opts)
    softplus = opts.pop("dt_softplus", False)
    inp = make_inputs(b, l, h, p, g, n, **opts)
    y, state = ops.ssd(**inp, dt_softplus=softplus, chunk_size=chunk, return_final_state=True)
    y_ref, state_ref = sequential_ssd(**inp, dt_softplus=softplus)
    assert y.shape == (b, l, h, p) and y.dtype == F64
    assert state.shape == (b, h, p, n) and state.dtype == F64
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(state, state_ref) < 1e-10
    y_only = ops.ssd(**inp, dt_softplus=softplus, chunk_size=chunk)
    assert torch.equal(y_only, y)


def test_chunk_size_does_not_change_result():
    inp = make_inputs(1, 50, 4, 3, 2, 5, D="h", init=True)
    outs = [ops.ssd(**inp, chunk_size=c, return_final_state=True) for c in (1, 5, 16, 50, 256)]
    for y, s in outs[1:]:
        assert rel_err(y, outs[0][0]) < 1e-12
        assert rel_err(s, outs[0][1]) < 1e-12


def test_strong_decay_stays_finite_and_correct():
    """Large |dt*A| over a long chunk: the segment-sum mask must not overflow or lose short segments."""
    inp = make_inputs(1, 64, 2, 2, 1, 3)
    inp["A"] = torch.tensor([-30.0, -0.01], dtype=F64)
    inp["dt"] = torch.rand(1, 64, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    y, s = ops.ssd(**inp, chunk_size=64, return_final_state=True)
    y_ref, s_ref = sequential_ssd(**inp)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    leaves = {k: v.clone().float().requires_grad_(True) for k, v in inp.items()}
    out = ops.ssd(**leaves, chunk_size=64)
    out.square().sum().backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3), (torch.float16, 1e-3)])
def test_low_precision_close_to_float64(dtype, tol):
    inp = make_inputs(2, 45, 4, 8, 2, 8, D="h", z=True, dt_bias=True, init=True, dtype=dtype)
    y, s = ops.ssd(**inp, dt_softplus=True, chunk_size=16, return_final_state=True)
    assert y.dtype == dtype and s.dtype == torch.float32
    y_ref, s_ref = sequential_ssd(**inp, dt_softplus=True)  # same (rounded) inputs, exact arithmetic
    assert rel_err(y, y_ref) < tol
    assert rel_err(s, s_ref) < 1e-5


def test_gradcheck_all_inputs():
    inp = make_inputs(1, 7, 4, 2, 2, 3, D="hp", z=True, dt_bias=True, init=True, seed=3)
    names = list(inp)
    leaves = [inp[k].clone().requires_grad_(True) for k in names]

    def fn(*ts):
        y, s = ops.ssd(**dict(zip(names, ts)), dt_softplus=True, chunk_size=3, return_final_state=True)
        return y, s

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_D_per_head_no_softplus():
    inp = make_inputs(2, 5, 2, 2, 1, 2, D="h", seed=4)
    names = list(inp)
    leaves = [inp[k].clone().requires_grad_(True) for k in names]
    fn = lambda *ts: ops.ssd(**dict(zip(names, ts)), chunk_size=2)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_match_sequential_reference():
    """Autograd through the chunked op equals autograd through the sequential loop."""
    inp = make_inputs(1, 23, 4, 3, 2, 4, D="h", z=True, dt_bias=True, init=True, seed=5)
    names = list(inp)
    a = [inp[k].clone().requires_grad_(True) for k in names]
    r = [inp[k].clone().requires_grad_(True) for k in names]
    w = torch.randn(1, 23, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    y, s = ops.ssd(**dict(zip(names, a)), dt_softplus=True, chunk_size=8, return_final_state=True)
    ((y * w).sum() + s.sum()).backward()
    y2, s2 = sequential_ssd(**dict(zip(names, r)), dt_softplus=True)
    ((y2 * w).sum() + s2.sum()).backward()
    for name, ta, tr in zip(names, a, r):
        assert rel_err(ta.grad, tr.grad) < 1e-10, name


def test_segsum_matches_direct_sums():
    a = torch.randn(2, 6, dtype=F64)
    out = segsum(a)
    for i in range(6):
        for j in range(6):
            if j <= i:
                assert torch.allclose(out[:, i, j], a[:, j + 1 : i + 1].sum(-1))
            else:
                assert torch.isinf(out[:, i, j]).all() and (out[:, i, j] < 0).all()


@pytest.mark.parametrize(
    "field,bad",
    [
        ("A", torch.zeros(3)),
        ("dt", torch.zeros(1, 5, 3)),
        ("B", torch.zeros(1, 5, 3, 2)),  # 3 groups do not divide 4 heads
        ("D", torch.zeros(4, 3)),
        ("z", torch.zeros(1, 5, 4, 3)),
        ("dt_bias", torch.zeros(2)),
        ("initial_state", torch.zeros(1, 4, 2, 4)),
    ],
)
def test_bad_shapes_raise_value_error(field, bad):
    inp = {k: v.float() for k, v in make_inputs(1, 5, 4, 2, 2, 3).items()}
    if field == "B":
        inp["C"] = bad
    inp[field] = bad
    with pytest.raises(ValueError, match=field):
        ops.ssd(**inp)


def test_bad_chunk_size_raises():
    inp = make_inputs(1, 5, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.ssd(**inp, chunk_size=0)


# ----------------------------------------------------------------------------------------- registry


@pytest.fixture
def spy_backend():
    calls: list[str] = []

    def make(tag):
        def fn(*args, **kwargs):
            calls.append(tag)
            return ops.ssd_torch(*args, **kwargs)

        return fn

    registry.register_ssd_backend("spy_hi", make("spy_hi"), available=lambda x: x.dtype == F64, priority=100)
    registry.register_ssd_backend("spy_lo", make("spy_lo"), available=lambda x: True, priority=50)
    yield calls
    registry.unregister_ssd_backend("spy_hi")
    registry.unregister_ssd_backend("spy_lo")


def test_torch_backend_registered():
    assert "torch" in ops.list_ssd_backends()
    assert ops.get_ssd_backend("torch") is ops.ssd_torch
    assert registry._BACKENDS["torch"].priority == 0


def test_auto_dispatch_by_priority_and_availability(spy_backend, monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert ops.list_ssd_backends()[:2] == ["spy_hi", "spy_lo"]
    inp = make_inputs(1, 6, 2, 2, 1, 3)
    y = ops.ssd(**inp, chunk_size=4)
    assert spy_backend == ["spy_hi"]
    assert rel_err(y, sequential_ssd(**inp)[0]) < 1e-10
    ops.ssd(**{k: v.float() for k, v in inp.items()})  # spy_hi unavailable for float32
    assert spy_backend == ["spy_hi", "spy_lo"]


def test_dispatch_by_argument(spy_backend, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "spy_hi")
    inp = make_inputs(1, 6, 2, 2, 1, 3)
    ops.ssd(**inp, backend="spy_lo")
    ops.ssd(**inp, backend="torch")
    assert spy_backend == ["spy_lo"]


def test_dispatch_by_env_var(spy_backend, monkeypatch):
    inp = make_inputs(1, 6, 2, 2, 1, 3)
    monkeypatch.setenv(registry.ENV_VAR, "spy_lo")
    ops.ssd(**inp)
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    ops.ssd(**inp)
    monkeypatch.setenv(registry.ENV_VAR, "auto")
    ops.ssd(**inp)
    assert spy_backend == ["spy_lo", "spy_hi"]


def test_unknown_backend_lists_names(monkeypatch):
    inp = make_inputs(1, 4, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="torch") as err:
        ops.ssd(**inp, backend="nope")
    assert "nope" in str(err.value)
    with pytest.raises(ValueError, match="torch"):
        ops.get_ssd_backend("nope")
    monkeypatch.setenv(registry.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="M4V_SSD_BACKEND|nope"):
        ops.ssd(**inp)


def test_explicit_unavailable_backend_raises(spy_backend, monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    inp = {k: v.float() for k, v in make_inputs(1, 4, 2, 2, 1, 3).items()}
    with pytest.raises(ValueError, match="not available"):
        ops.ssd(**inp, backend="spy_hi")
    assert spy_backend == []


def test_softplus_reference_is_torch_softplus():
    """Guard for the reference itself: its softplus equals torch's on the range the tests use."""
    v = torch.linspace(-5, 5, 11, dtype=F64)
    assert torch.allclose(torch.log1p(torch.exp(v)), F.softplus(v))
