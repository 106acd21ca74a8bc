"""Zigzag scan paths (paper A.1): hand-computed grids, validity, adjacency, inverses."""

import pytest
import torch

from m4v.layers.zigzag import NUM_PATHS, inverse_permutation, layer_path, zigzag_path, zigzag_sequence

# 3 x 4 grid, flat index r*4 + c:
#  0  1  2  3
#  4  5  6  7
#  8  9 10 11
HAND = {
    0: [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],  # (a) top-left, down first then right
    1: [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],  # (b) top-left, right first then down
    2: [8, 4, 0, 1, 5, 9, 10, 6, 2, 3, 7, 11],  # (c) bottom-left, up first then right
    3: [8, 9, 10, 11, 7, 6, 5, 4, 0, 1, 2, 3],  # (d) bottom-left, right first then up
    4: [11, 7, 3, 2, 6, 10, 9, 5, 1, 0, 4, 8],  # (e) bottom-right, up first then left
    5: [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],  # (f) bottom-right, left first then up
    6: [3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0],  # (g) top-right, down first then left
    7: [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8],  # (h) top-right, left first then down
}


@pytest.mark.parametrize("k", range(NUM_PATHS))
def test_hand_computed_3x4(k):
    assert zigzag_path(3, 4, k).tolist() == HAND[k]


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (5, 1), (2, 2), (3, 7), (6, 10), (12, 20)])
@pytest.mark.parametrize("k", range(NUM_PATHS))
def test_valid_permutation_and_adjacent_steps(h, w, k):
    perm = zigzag_path(h, w, k)
    assert sorted(perm.tolist()) == list(range(h * w))
    r, c = perm // w, perm % w
    steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
    assert bool((steps == 1).all()), "consecutive tokens of a zigzag path must be grid neighbours"
    x = torch.randn(h * w, 3)
    assert torch.equal(x[perm][inverse_permutation(perm)], x)


def test_paths_start_at_their_corners():
    h, w = 4, 6
    corners = {0: 0, 1: 0, 2: (h - 1) * w, 3: (h - 1) * w, 4: h * w - 1, 5: h * w - 1, 6: w - 1, 7: w - 1}
    for k, start in corners.items():
        assert zigzag_path(h, w, k)[0].item() == start
    assert len({tuple(zigzag_path(h, w, k).tolist()) for k in range(8)}) == 8


def test_pyramid_sequence_and_layer_cycle():
    sizes = [(1, 2), (2, 4), (4, 8)]
    seq = zigzag_sequence(sizes, 3)
    assert seq[:2].tolist() == zigzag_path(1, 2, 3).tolist()
    assert seq[2:10].tolist() == (zigzag_path(2, 4, 3) + 2).tolist()
    assert seq[10:].tolist() == (zigzag_path(4, 8, 3) + 10).tolist()
    assert sorted(seq.tolist()) == list(range(2 + 8 + 32))
    assert [layer_path(i) for i in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="path k"):
        zigzag_path(2, 2, 8)
    with pytest.raises(ValueError, match="grid size"):
        zigzag_path(0, 2, 0)
