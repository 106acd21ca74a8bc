"""MM-Token Re-Composition and its inverse (paper Sec. 3.3, Fig. 2c).

Sequence fed to the SSM: ``[Z_l, r, x^0, r, x^1, ..., r, x^i, Z_r]`` where ``Z_l`` is the text
left-padded with zeros (the state stays zero until the first real text token), ``r`` a per-frame
register of one of 3 learnable types (one per pyramid resolution level), each frame scanned along a
zigzag path, and ``Z_r`` the text again, right-padded, so that visual information flows back into
the text.  The inverse drops the registers, restores the token order and sums the two text outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from m4v.layers.zigzag import inverse_permutation, zigzag_sequence

NUM_REGISTER_TYPES = 3


def register_types(sizes: Sequence[tuple[int, int]], num_types: int = NUM_REGISTER_TYPES) -> list[int]:
    """Register type of each frame: its pyramid level relative to the current (last) frame.

    The current frame's resolution is type ``num_types - 1``; each halving below it is one type
    lower (clamped at 0).  At the last pyramid stage this gives 0/1/2 for 1/4, 1/2 and full
    resolution, the three resolution levels of the paper.
    """
    if not sizes:
        return []
    H = sizes[-1][0]
    types = []
    for h, _ in sizes:
        level, r = 0, H
        while r > h:
            r //= 2
            level += 1
        types.append(max(num_types - 1 - level, 0))
    return types


@dataclass
class TextArrangement:
    """Per-sample gather indices that place the valid text tokens right-aligned (Z_l) and left-aligned (Z_r).

    Built once per text mask, so that composing is one gather (both halves) and one masked fill, and inverting
    two gathers, an add and a masked fill (eager, each op is a kernel launch of its own).
    """

    left_valid: torch.Tensor  # [B, L] bool: Z_l slot i holds a token
    right_valid: torch.Tensor  # [B, L] bool: Z_r slot j holds the j-th valid token
    slots: torch.Tensor  # [B, 2L] original position read by each Z_l slot, then each Z_r slot (any on padding)
    slot_pad: torch.Tensor  # [B, 2L, 1] bool: padded slot of [Z_l, Z_r]
    inv_left: torch.Tensor  # [B, L] Z_l slot holding each original position
    inv_right: torch.Tensor  # [B, L] Z_r slot holding each original position
    text_pad: torch.Tensor  # [B, L, 1] bool: padding in the original order

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> TextArrangement:
        B, L = mask.shape
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # original positions, valid first
        count = mask.sum(1)
        slots = torch.arange(L, device=mask.device)[None]
        right_valid = slots < count[:, None]
        left_valid = slots >= (L - count)[:, None]
        left_src = (slots - L + count[:, None]) % max(L, 1)  # Z_l slot i holds sorted token left_src[i]
        rank = torch.empty_like(order).scatter_(1, order, slots.expand(B, -1).contiguous())  # inverse of order
        return cls(
            left_valid=left_valid,
            right_valid=right_valid,
            slots=torch.cat([order.gather(1, left_src), order], 1),
            slot_pad=torch.cat([~left_valid, ~right_valid], 1)[..., None],
            inv_left=(rank + L - count[:, None]) % max(L, 1),
            inv_right=rank,
            text_pad=~mask.bool()[..., None],
        )

    def compose(self, text: torch.Tensor, right: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Z_l, Z_r) from text [B, L, D]; padded slots are exact zeros."""
        L, D = text.shape[1], text.shape[-1]
        n = 2 * L if right else L
        z = torch.gather(text, 1, self.slots[:, :n, None].expand(-1, -1, D)).masked_fill(self.slot_pad[:, :n], 0)
        if not right:
            return z, None
        z_l, z_r = z.split(L, 1)
        return z_l, z_r

    def invert(self, y_l: torch.Tensor, y_r: torch.Tensor | None) -> torch.Tensor:
        """Text outputs in the original order: Z'_l + Z'_r aligned token by token; zeros at padding."""
        D = y_l.shape[-1]
        out = torch.gather(y_l, 1, self.inv_left[..., None].expand(-1, -1, D))
        if y_r is not None:
            out = out + torch.gather(y_r, 1, self.inv_right[..., None].expand(-1, -1, D))
        return out.masked_fill(self.text_pad, 0)


@lru_cache(maxsize=512)
def _visual_indices(
    sizes: tuple[tuple[int, int], ...], path: int, registers: bool, types: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vis_index, vis_inverse) on the CPU for one frame layout and scan path (cached: shapes repeat every step).

    ``types`` gives each frame's register type; by default its pyramid level (``register_types``).
    """
    perm = zigzag_sequence(sizes, path)
    offsets = [0]
    for h, w in sizes:
        offsets.append(offsets[-1] + h * w)
    parts = []
    types = register_types(sizes) if types is None else types
    for f in range(len(sizes)):
        if registers:
            parts.append(torch.tensor([types[f]], dtype=torch.long))
        parts.append(perm[offsets[f] : offsets[f + 1]] + NUM_REGISTER_TYPES)
    vis_index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    positions = torch.nonzero(vis_index >= NUM_REGISTER_TYPES).squeeze(1)
    return vis_index, positions[inverse_permutation(perm)]


_DEVICE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def visual_indices(
    sizes: Sequence[tuple[int, int]],
    path: int,
    registers: bool,
    device: torch.device,
    types: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached device copies of the visual gather indices (no host-to-device copy once warm)."""
    frozen_types = None if types is None else tuple(int(t) for t in types)
    key = (tuple((int(h), int(w)) for h, w in sizes), int(path), bool(registers), frozen_types, str(device))
    if key not in _DEVICE_CACHE:
        if len(_DEVICE_CACHE) > 1024:
            _DEVICE_CACHE.clear()
        idx, inv = _visual_indices(key[0], key[1], key[2], key[3])
        _DEVICE_CACHE[key] = (idx.to(device), inv.to(device))
    return _DEVICE_CACHE[key]


@dataclass
class RecompositionPlan:
    """Precomputed indices of one re-composition (one frame layout, one scan path, one text mask)."""

    text: TextArrangement
    text_len: int
    vis_index: torch.Tensor  # [Lv] indices into cat([registers (3), visual tokens])
    vis_inverse: torch.Tensor  # [Nv] position in the visual block of each original visual token
    recompose_text: bool
    _keep: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        sizes: Sequence[tuple[int, int]],
        text_mask: torch.Tensor,
        path: int,
        recompose_text: bool = True,
        registers: bool = True,
        text: TextArrangement | None = None,
    ) -> RecompositionPlan:
        vis_index, vis_inverse = visual_indices(sizes, path, registers, text_mask.device)
        text = text if text is not None else TextArrangement.from_mask(text_mask.bool())
        return cls(text, text_mask.shape[1], vis_index, vis_inverse, recompose_text)

    @property
    def visual_len(self) -> int:
        return self.vis_index.numel()

    def keep_mask(self) -> torch.Tensor:
        """[B, S] True where the sequence holds a real token (False on text padding)."""
        if self._keep is None:
            self._keep = self._build_keep()
        return self._keep

    def _build_keep(self) -> torch.Tensor:
        parts = [self.text.left_valid, torch.ones_like(self.text.left_valid[:, :1]).expand(-1, self.visual_len)]
        if self.recompose_text:
            parts.append(self.text.right_valid)
        return torch.cat(parts, 1)

    def compose(self, text: torch.Tensor, visual: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
        """[Z_l, r, x^0, ..., r, x^i, Z_r] from text [B, L, D], visual [B, Nv, D], registers [3, D]."""
        B = visual.shape[0]
        z_l, z_r = self.text.compose(text, right=self.recompose_text)
        src = torch.cat([registers.to(visual.dtype)[None].expand(B, -1, -1), visual], 1)
        parts = [z_l, _ScanOrder.apply(src, self.vis_index, self.vis_inverse, True)]
        if z_r is not None:
            parts.append(z_r)
        return torch.cat(parts, 1)

    def invert(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text [B, L, D], visual [B, Nv, D]) outputs from the SSM output over the composed sequence."""
        L, Lv = self.text_len, self.visual_len
        # one split, not slices: its backward is one concatenation (a slice's is a zero-filled copy of all of y)
        y_l, y_v, y_r = y.split([L, Lv, y.shape[1] - L - Lv], 1)
        text = self.text.invert(y_l, y_r if self.recompose_text else None)
        visual = _ScanOrder.apply(y_v, self.vis_index, self.vis_inverse, False)
        return text, visual


class _ScanOrder(torch.autograd.Function):
    """The visual re-composition gathers, each differentiated by the other one (a gather, not a scatter).

    ``to_scan``: ``src[:, vis_index]`` for ``src = [registers, visual tokens]``; otherwise ``y[:, vis_inverse]``, the
    visual tokens back in their order. ``index_select``'s own backward is an atomic ``index_add`` (0.26 ms per call
    at 15,488 tokens on an H100, 10x a gather). Every visual token sits at exactly one place, so each direction's
    gradient is the other direction's gather; the few register rows are summed per type by a one-hot product.
    """

    @staticmethod
    def forward(  # noqa: ANN001 - ctx
        ctx, x: torch.Tensor, vis_index: torch.Tensor, vis_inverse: torch.Tensor, to_scan: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(vis_index, vis_inverse)
        ctx.to_scan = to_scan
        return x.index_select(1, vis_index if to_scan else vis_inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        vis_index, vis_inverse = ctx.saved_tensors
        if ctx.to_scan:
            onehot = (vis_index[:, None] == torch.arange(NUM_REGISTER_TYPES, device=vis_index.device)).to(grad.dtype)
            d_x = torch.cat([torch.einsum("bld,lr->brd", grad, onehot), grad.index_select(1, vis_inverse)], 1)
        else:
            zeros = grad.new_zeros(grad.shape[0], NUM_REGISTER_TYPES, grad.shape[2])
            d_x = torch.cat([zeros, grad], 1).index_select(1, vis_index)
        return d_x, None, None, None
