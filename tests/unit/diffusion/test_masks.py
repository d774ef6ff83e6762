"""Random training masks: shapes, the structure of each kind, reproducibility, kind frequencies."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffuse.diffusion.masks import (
    MASK_KINDS,
    MAX_BOXES,
    box_masks,
    check_mask_kinds,
    draw_masks,
    half_masks,
    stroke_masks,
)
from diffuse.errors import UserError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def only(kind):
    return check_mask_kinds({kind: 1.0})


@pytest.mark.parametrize("h,w", [(16, 16), (8, 12), (5, 7)])
def test_shapes_values_and_kinds(h, w):
    for kind in MASK_KINDS:
        m = draw_masks(64, h, w, only(kind), gen())
        assert m.shape == (64, 1, h, w) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        frac = m.flatten(1).mean(1)
        if kind == "none":
            assert (frac == 1).all()
        else:  # something to generate and something known, in every mask
            assert (frac > 0).all() and (frac < 1).all(), kind


def _distinct(a: np.ndarray, axis: int) -> int:
    return len({tuple(r) for r in (a if axis == 0 else a.T)})


def test_boxes_are_unions_of_at_most_three_rectangles():
    single = box_masks(200, 16, 16, gen())
    m = draw_masks(300, 16, 16, only("boxes"), gen(1))[:, 0].numpy()
    sizes = []
    for a in m:
        # k axis-aligned rectangles cut the rows (and the columns) into at most 2k+1 distinct patterns
        assert _distinct(a, 0) <= 2 * MAX_BOXES + 1 and _distinct(a, 1) <= 2 * MAX_BOXES + 1
        sizes.append(a.mean())
    assert 9 / 256 <= min(sizes) and max(sizes) <= 0.75  # sides 3..8 pixels (0.2..0.5 of 16), up to three boxes
    # with one box forced: exactly a filled rectangle, its sides 3..8 pixels of 16 (0.2..0.5, rounded)
    from diffuse.diffusion import masks as M

    g = gen(2)
    params = M._box_params(200, 16, 16, g)
    params[0] = torch.ones_like(params[0])
    for a in M._render_boxes(params, 16, 16)[:, 0].numpy():
        rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
        assert a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and a.sum() == len(rows) * len(cols)
        assert 3 <= len(rows) <= 8 and 3 <= len(cols) <= 8
    assert single.shape == (200, 1, 16, 16)


def test_strokes_are_connected_thin_and_not_boxes():
    m = stroke_masks(300, 16, 16, gen())[:, 0].numpy()
    many_patterns = 0
    for a in m:
        _, parts = ndimage.label(a, structure=np.ones((3, 3)))
        assert parts == 1  # one brush stroke: a single 8-connected region
        many_patterns += _distinct(a, 0) > 2 * MAX_BOXES + 1
    assert 0.03 < m.mean() < 0.3  # a stroke, not a region
    assert many_patterns > 30  # curved strokes are not unions of a few rectangles


def test_halves_are_one_of_four_halves():
    m = half_masks(400, 6, 9, gen())[:, 0]
    left = torch.zeros(6, 9)
    left[:, :5] = 1
    right = torch.zeros(6, 9)
    right[:, 4:] = 1
    top = torch.zeros(6, 9)
    top[:3] = 1
    bottom = torch.zeros(6, 9)
    bottom[3:] = 1
    counts = [0] * 4
    for a in m:
        hits = [i for i, ref in enumerate((left, right, top, bottom)) if torch.equal(a, ref)]
        assert len(hits) == 1
        counts[hits[0]] += 1
    assert min(counts) > 60  # each half about 1/4 of the time


def test_reproducible_and_stream_use_independent_of_probabilities():
    p = check_mask_kinds({"boxes": 0.3, "strokes": 0.3, "half": 0.2, "none": 0.2})
    a, b = gen(7), gen(7)
    assert torch.equal(draw_masks(50, 16, 16, p, a), draw_masks(50, 16, 16, p, b))
    assert not torch.equal(draw_masks(50, 16, 16, p, gen(7)), draw_masks(50, 16, 16, p, gen(8)))
    # the generator ends in the same state whatever the probabilities: a run's later draws do not depend on them
    c = gen(7)
    draw_masks(50, 16, 16, only("half"), c)
    assert torch.equal(a.get_state(), c.get_state())


def test_kind_frequencies_follow_the_probabilities():
    p = check_mask_kinds({"half": 3, "none": 1})  # normalised: 0.75 / 0.25
    m = draw_masks(4000, 8, 8, p, gen())
    none = (m.flatten(1).mean(1) == 1).float().mean().item()
    # binomial standard error sqrt(0.25 * 0.75 / 4000) = 0.007: within 4 of them
    assert abs(none - 0.25) < 0.028


@pytest.mark.parametrize(
    "kinds,needle",
    [
        ({"boxes": 0.5, "blobs": 0.5}, "mask_kinds.blobs"),
        ({"boxes": -1}, "mask_kinds.boxes=-1"),
        ({"boxes": 0, "none": 0}, "at least one"),
        ("boxes", "mask_kinds='boxes'"),
    ],
)
def test_bad_kinds_are_refused(kinds, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("'", ".").replace("[", r"\[")):
        check_mask_kinds(kinds)
