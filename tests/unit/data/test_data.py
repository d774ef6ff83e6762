import pytest
import torch
from safetensors.torch import save_file

from diffuse.data import build_dataset
from diffuse.data.gmm import load_mixture
from diffuse.data.shapes import render_shapes
from diffuse.errors import UserError


def test_shapes_are_deterministic_and_labelled():
    a, la = render_shapes(64, 16, seed=3)
    b, lb = render_shapes(64, 16, seed=3)
    c, _ = render_shapes(64, 16, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 16, 16)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert set(la.tolist()) <= {0, 1, 2, 3}


def test_shape_classes_differ_in_geometry():
    """Class is shape kind: the fraction of the bounding box a shape fills is its signature
    (circle pi/4, square 1, triangle ~1/2, cross ~0.51)."""
    x, y = render_shapes(400, 32, seed=0)
    fg = (x.float().max(1).values > 60).float()  # foreground pixels: the background is dark
    fill = []
    for k in range(4):
        m = fg[y == k]
        rows, cols = m.amax(2).sum(1), m.amax(1).sum(1)
        fill.append((m.sum((1, 2)) / (rows * cols)).mean().item())
    assert fill[1] > 0.9  # square fills its box
    assert 0.7 < fill[0] < 0.85  # circle: pi/4
    assert fill[2] < 0.65 and fill[3] < 0.65  # triangle and cross leave corners empty


def test_gmm_dataset_from_file(tmp_path, compose_cfg):
    p = tmp_path / "mix.safetensors"
    means = torch.stack([torch.full((1, 2, 2), -0.5), torch.full((1, 2, 2), 0.5)])
    save_file({"means": means, "stds": torch.tensor([0.1, 0.2]), "weights": torch.tensor([0.25, 0.75])}, str(p))
    cfg = compose_cfg("train", ["dataset=gmm", f"dataset.path={p}", "dataset.size=4000"])
    ds = build_dataset(cfg.dataset)
    assert ds.images.shape == (4000, 1, 2, 2) and ds.num_classes == 2
    frac = (ds.labels == 1).float().mean().item()
    assert abs(frac - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5
    x1 = ds.images[ds.labels == 1]
    assert abs(x1.mean().item() - 0.5) < 0.01 and abs(x1.std().item() - 0.2) < 0.01


def test_bad_mixture_files(tmp_path):
    p = tmp_path / "bad.safetensors"
    save_file(
        {"means": torch.zeros(2, 1, 2, 2), "stds": torch.tensor([0.1, -0.2]), "weights": torch.tensor([0.5, 0.5])},
        str(p),
    )
    with pytest.raises(UserError, match="stds"):
        load_mixture(p)
    with pytest.raises(UserError, match="no such file"):
        load_mixture(tmp_path / "missing.safetensors")
