"""Temporal branch (paper Sec. 3.3): explicit-loop reference and causality in time."""

import math

import torch

from m4v.layers.temporal_branch import TemporalBranch


def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def reference(tb: TemporalBranch, h: torch.Tensor, sizes, pool=None, unpool=None):
    """Loop-by-loop reading of the paper's temporal branch, float64.

    ``pool(frame [B, a, b, D], hs, ws)`` / ``unpool(out [B, hs, ws, D], a, b)`` replace the block mean and the
    block repeat (for grids that are not whole blocks of the smallest one)."""
    B, _, D = h.shape
    nh, hd = tb.num_heads, D // tb.num_heads
    H, W = sizes[-1]
    hs, ws = min(s[0] for s in sizes), min(s[1] for s in sizes)
    K = H // hs
    Wqkv, bqkv = tb.qkv.weight.double(), tb.qkv.bias.double()
    frames, off = [], 0
    for a, b in sizes:
        frames.append(h[:, off : off + a * b].reshape(B, a, b, D))
        off += a * b
    tokens = []  # each [B, hs, ws, D] pooled / strided
    for (a, b), f in zip(sizes[:-1], frames[:-1]):
        if pool is not None:
            tokens.append(pool(f, hs, ws))
            continue
        fa, fb = a // hs, b // ws
        pooled = torch.zeros(B, hs, ws, D, dtype=torch.float64)
        for i in range(hs):
            for j in range(ws):
                pooled[:, i, j] = f[:, i * fa : (i + 1) * fa, j * fb : (j + 1) * fb].mean((1, 2))
        tokens.append(pooled)
    for u in range(K):
        for v in range(K):
            tokens.append(frames[-1][:, u::K, v::K])
    T, nhist = len(tokens), len(sizes) - 1
    qkv = [t @ Wqkv.T + bqkv for t in tokens]
    out = torch.zeros(B, T, hs, ws, D, dtype=torch.float64)
    for head in range(nh):
        sl = slice(head * hd, (head + 1) * hd)
        q = torch.stack([_rms(x[..., :D][..., sl], tb.norm_q.weight.double()).reshape(B, -1) for x in qkv], 1)
        k = torch.stack([_rms(x[..., D : 2 * D][..., sl], tb.norm_k.weight.double()).reshape(B, -1) for x in qkv], 1)
        v = torch.stack([x[..., 2 * D :][..., sl].reshape(B, -1) for x in qkv], 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        for t in range(T):
            for s in range(T):
                if min(s, nhist) > min(t, nhist):
                    scores[:, t, s] = -math.inf
        o = scores.softmax(-1) @ v
        out[..., sl] = o.reshape(B, T, hs, ws, hd)
    res = []
    for t, (a, b) in enumerate(sizes[:-1]):
        if unpool is not None:
            res.append(unpool(out[:, t], a, b).reshape(B, a * b, D))
            continue
        fa, fb = a // hs, b // ws
        res.append(out[:, t].repeat_interleave(fa, 1).repeat_interleave(fb, 2).reshape(B, a * b, D))
    cur = torch.zeros(B, H, W, D, dtype=torch.float64)
    for u in range(K):
        for v in range(K):
            cur[:, u::K, v::K] = out[:, nhist + u * K + v]
    return torch.cat(res + [cur.reshape(B, H * W, D)], 1)


def test_matches_loop_reference():
    torch.manual_seed(0)
    tb = TemporalBranch(8, 2).double()
    for s in (tb.norm_q.weight, tb.norm_k.weight):
        s.data.uniform_(0.5, 1.5)
    for sizes in ([(2, 3), (2, 3), (4, 6), (8, 12), (8, 12)], [(2, 2), (4, 4), (4, 4)], [(4, 4)], [(2, 2), (2, 2)]):
        n = sum(a * b for a, b in sizes)
        h = torch.randn(2, n, 8, dtype=torch.float64)
        out = tb(h, sizes)
        ref = reference(tb, h, sizes)
        assert torch.allclose(out, ref, atol=1e-10), sizes


def test_history_grid_not_in_whole_blocks_uses_adaptive_pooling():
    """A history grid that is not a whole number of smallest-grid blocks (5x5 over 2x2): adaptive average
    pooling in, nearest upsampling out, each cell computed here from its own window."""
    def pool(f, hs, ws):  # adaptive pooling window of cell (i, j): rows floor(i*a/hs) .. ceil((i+1)*a/hs)
        B, a, b, D = f.shape
        out = torch.zeros(B, hs, ws, D, dtype=f.dtype)
        for i in range(hs):
            for j in range(ws):
                r0, r1 = (i * a) // hs, -(-((i + 1) * a) // hs)
                c0, c1 = (j * b) // ws, -(-((j + 1) * b) // ws)
                out[:, i, j] = f[:, r0:r1, c0:c1].mean((1, 2))
        return out

    def unpool(o, a, b):  # nearest: cell (r, c) reads (floor(r*hs/a), floor(c*ws/b))
        hs, ws = o.shape[1:3]
        rows = torch.tensor([(r * hs) // a for r in range(a)])
        cols = torch.tensor([(c * ws) // b for c in range(b)])
        return o[:, rows][:, :, cols]

    torch.manual_seed(3)
    tb = TemporalBranch(8, 2).double()
    sizes = [(2, 2), (5, 5), (10, 10)]
    h = torch.randn(2, sum(a * b for a, b in sizes), 8, dtype=torch.float64)
    ref = reference(tb, h, sizes, pool=pool, unpool=unpool)
    assert torch.allclose(tb(h, sizes), ref, atol=1e-10)


def test_no_frame_sees_a_later_one():
    torch.manual_seed(1)
    tb = TemporalBranch(8, 2).double()
    sizes = [(2, 2), (2, 2), (4, 4), (8, 8), (8, 8)]
    lens = [a * b for a, b in sizes]
    offs = [sum(lens[:i]) for i in range(len(lens) + 1)]
    h = torch.randn(1, offs[-1], 8, dtype=torch.float64)
    base = tb(h, sizes)
    for f in range(len(sizes)):
        h2 = h.clone()
        h2[:, offs[f] : offs[f + 1]] += torch.randn(1, lens[f], 8, dtype=torch.float64)
        out = tb(h2, sizes)
        assert torch.equal(out[:, : offs[f]], base[:, : offs[f]]), f"frame {f} leaked into earlier frames"
        assert not torch.allclose(out[:, offs[f] :], base[:, offs[f] :]), "a frame must influence itself"


def test_single_frame_shortcut_matches_folded_path_with_gradients():
    """A first frame (no history) takes the value-projection shortcut: same output and gradients as the folded
    attention it replaces (softmax over one key is 1; q and k get zero gradient either way)."""
    torch.manual_seed(2)
    tb = TemporalBranch(8, 2).double()
    h = torch.randn(2, 4 * 6, 8, dtype=torch.float64)
    results = []
    for fn in (tb, tb.folded):
        tb.zero_grad()
        x = h.clone().requires_grad_(True)
        out = fn(x, [(4, 6)])
        out.pow(2).sum().backward()
        grads = (tb.qkv.weight.grad.clone(), tb.qkv.bias.grad.clone(), tb.norm_q.weight.grad, tb.norm_k.weight.grad)
        results.append((out.detach(), x.grad, *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12)
    assert results[0][2][:16].abs().max() == 0  # q and k rows
    assert results[0][4] is not None and results[0][4].abs().max() == 0  # q/k norms: zero gradient, not None
