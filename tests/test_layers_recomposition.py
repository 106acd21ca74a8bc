"""MM-Token Re-Composition (paper Sec. 3.3): hand-built sequences, inverse, masks of different lengths."""

import torch

from m4v.layers.recomposition import NUM_REGISTER_TYPES, RecompositionPlan, TextArrangement, register_types
from m4v.layers.zigzag import zigzag_path


def _tagged(B, n, D, base):
    """Tokens whose first feature is a unique tag: base + index, so positions can be read back."""
    x = torch.zeros(B, n, D)
    x[..., 0] = base + torch.arange(n, dtype=torch.float)[None]
    x[..., 1] = torch.arange(B, dtype=torch.float)[:, None]
    return x


def test_register_types_follow_pyramid_levels():
    assert register_types([(1, 2), (1, 2), (2, 4), (4, 8), (4, 8)]) == [0, 0, 1, 2, 2]
    assert register_types([(1, 2), (2, 4), (2, 4)]) == [1, 2, 2]  # middle stage: current at 1/2
    assert register_types([(1, 2), (1, 2)]) == [2, 2]  # first stage: everything at 1/4


def test_sequence_layout_by_hand():
    # text of length 4: sample 0 has 3 valid tokens, sample 1 has 1; frames 1x2 (1/4 level) and 2x4
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    sizes = [(1, 2), (2, 2)]
    plan = RecompositionPlan.build(sizes, mask, path=1)  # path (b): plain row snake
    text = _tagged(2, 4, 4, 100)
    vis = _tagged(2, 6, 4, 0)
    regs = torch.zeros(NUM_REGISTER_TYPES, 4)
    regs[:, 0] = torch.tensor([-1.0, -2.0, -3.0])
    seq = plan.compose(text, vis, regs)
    tags = seq[..., 0]
    # sample 0: Z_l = [0, t0, t1, t2]; r(type 1), f0 tokens 0,1; r(type 2), f1 row snake 2,3,5,4; Z_r = [t0,t1,t2,0]
    assert tags[0].tolist() == [0, 100, 101, 102, -2, 0, 1, -3, 2, 3, 5, 4, 100, 101, 102, 0]
    assert tags[1].tolist() == [0, 0, 0, 100, -2, 0, 1, -3, 2, 3, 5, 4, 100, 0, 0, 0]
    # padded slots are exact zeros in every feature
    assert seq[1, :3].abs().sum() == 0 and seq[1, -3:].abs().sum() == 0
    keep = plan.keep_mask()
    assert keep[1].tolist() == [False] * 3 + [True] * 9 + [True] + [False] * 3


def test_inverse_restores_order_and_sums_text():
    torch.manual_seed(0)
    B, L, D = 3, 5, 6
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    sizes = [(2, 3), (2, 3), (4, 6)]
    for path in range(8):
        plan = RecompositionPlan.build(sizes, mask, path)
        text, vis = torch.randn(B, L, D), torch.randn(B, 6 + 6 + 24, D)
        seq = plan.compose(text, vis, torch.randn(3, D))
        t_out, v_out = plan.invert(seq)  # identity "SSM": text appears twice, so it comes back doubled
        assert torch.equal(v_out, vis)
        assert torch.allclose(t_out, 2 * text * mask[..., None])
        # the visual tokens of each frame follow its zigzag path
        start = L + 1
        assert torch.equal(seq[:, start : start + 6], vis[:, zigzag_path(2, 3, path)])


def test_valid_text_adjacent_to_video_on_both_sides():
    mask = torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool)  # arbitrary (non-prefix) mask
    arr = TextArrangement.from_mask(mask)
    text = _tagged(1, 5, 2, 10)
    z_l, z_r = arr.compose(text)
    assert z_l[0, :, 0].tolist() == [0, 0, 11, 13, 14]
    assert z_r[0, :, 0].tolist() == [11, 13, 14, 0, 0]
    back = arr.invert(z_l, z_r)
    assert back[0, :, 0].tolist() == [0, 22, 0, 26, 28]


def _text_loops(mask, text, y_l, y_r):
    """Paper 3.3 by per-sample loops: Z_l = [0, Z], Z_r = [Z, 0] (Z the valid tokens in order); the inverse adds the
    two outputs of each valid token back at its position, zeros at padding."""
    B, L, D = text.shape
    z_l, z_r, back = torch.zeros_like(text), torch.zeros_like(text), torch.zeros_like(text)
    for b in range(B):
        pos = [p for p in range(L) if mask[b, p]]
        n = len(pos)
        for j, p in enumerate(pos):
            z_l[b, L - n + j] = text[b, p]
            z_r[b, j] = text[b, p]
            back[b, p] = y_l[b, L - n + j] + y_r[b, j]
    return z_l, z_r, back


def test_text_arrangement_batch_against_loops_with_gradients():
    """A batch of masks (all valid, all padding, holes, random): compose, invert and their gradients (float64)."""
    g = torch.Generator().manual_seed(3)
    L, D = 7, 3
    mask = torch.rand(5, L, generator=g) < 0.5
    mask[0], mask[1] = True, False
    mask[2] = torch.tensor([0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    text, y_l, y_r = (torch.randn(5, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    arr = TextArrangement.from_mask(mask)
    z_l, z_r = arr.compose(text)
    back = arr.invert(y_l, y_r)
    want = _text_loops(mask, text, y_l, y_r)
    for got, ref in zip((z_l, z_r, back), want):
        assert torch.equal(got, ref)
    z_only, none = arr.compose(text, right=False)
    assert none is None and torch.equal(z_only, want[0])
    assert torch.equal(arr.invert(y_l, None), _text_loops(mask, text, y_l, torch.zeros_like(y_r))[2])
    cot = [torch.randn(5, L, D, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves = (text, y_l, y_r)
    got = torch.autograd.grad(sum((t * c).sum() for t, c in zip((z_l, z_r, back), cot)), leaves)
    ref = torch.autograd.grad(sum((t * c).sum() for t, c in zip(want, cot)), leaves)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_switches_off():
    mask = torch.ones(1, 2, dtype=torch.bool)
    plan = RecompositionPlan.build([(1, 1), (2, 2)], mask, 0, recompose_text=False, registers=False)
    seq = plan.compose(_tagged(1, 2, 2, 100), _tagged(1, 5, 2, 0), torch.zeros(3, 2))
    assert seq[0, :, 0].tolist() == [100, 101, 0, 1, 3, 4, 2]  # [Z, f0, f1 column snake], no registers/Z_r
    t, v = plan.invert(seq)
    assert t[0, :, 0].tolist() == [100, 101] and v[0, :, 0].tolist() == [0, 1, 2, 3, 4]


def test_gradients_of_compose_and_invert_match_index_select():
    """The gather-only backward of compose / invert: the same gradients as autograd of plain index_select (float64)."""
    torch.manual_seed(0)
    B, L, D = 2, 4, 5
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    sizes = [(1, 2), (1, 2), (2, 4), (4, 8), (4, 8)]
    nv = sum(h * w for h, w in sizes)
    for registers in (True, False):
        for path in (0, 5):
            plan = RecompositionPlan.build(sizes, mask, path, registers=registers)
            vis = torch.randn(B, nv, D, dtype=torch.float64, requires_grad=True)
            regs = torch.randn(NUM_REGISTER_TYPES, D, dtype=torch.float64, requires_grad=True)
            y = torch.randn(B, L + plan.visual_len, D, dtype=torch.float64, requires_grad=True)
            g_seq = torch.randn(B, 2 * L + plan.visual_len, D, dtype=torch.float64)
            g_vis = torch.randn(B, nv, D, dtype=torch.float64)

            def reference(vis, regs, y, plan=plan):
                src = torch.cat([regs[None].expand(B, -1, -1), vis], 1)
                composed = src.index_select(1, plan.vis_index)
                inverted = y[:, L : L + plan.visual_len].index_select(1, plan.vis_inverse)
                return composed, inverted

            seq = plan.compose(torch.zeros(B, L, D, dtype=torch.float64), vis, regs)
            composed = seq[:, L : L + plan.visual_len]
            inverted = plan.invert(torch.cat([y, torch.zeros(B, L, D, dtype=torch.float64)], 1))[1]
            want_c, want_i = reference(vis, regs, y)
            assert torch.equal(composed, want_c) and torch.equal(inverted, want_i)
            g_c = g_seq[:, L : L + plan.visual_len]
            got = torch.autograd.grad((composed * g_c).sum() + (inverted * g_vis).sum(), (vis, regs, y))
            want = torch.autograd.grad((want_c * g_c).sum() + (want_i * g_vis).sum(), (vis, regs, y))
            for a, e in zip(got, want):
                assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)
            if not registers:
                assert torch.equal(got[1], torch.zeros_like(got[1]))
