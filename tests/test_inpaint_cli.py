"""diffuse inpaint in a subprocess with the mixture oracle: outputs, exact known pixels (bad input: test_bad_input.py)."""

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import diffuse

ORACLE = ["model=oracle", "dataset=gmm", "steps=10", "inpaint.resamples=2", "inpaint.jump_length=5"]


@pytest.fixture
def files(tmp_path):
    a = (np.random.RandomState(0).rand(8, 8, 3) * 255).astype("uint8")
    Image.fromarray(a).save(tmp_path / "img.png")
    m = np.zeros((8, 8), "uint8"); m[:, 4:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((8, 8), "uint8")).save(tmp_path / "black.png")
    Image.fromarray(np.full((8, 8), 255, "uint8")).save(tmp_path / "white.png")
    return tmp_path, a


def test_inpaint_oracle_keeps_known_pixels_exactly(files):
    d, a = files
    r = diffuse("inpaint", "--image", "img.png", "--mask", "mask.png", *ORACLE, "n=2", "hydra.run.dir=r", cwd=d)
    assert r.returncode == 0, r.stderr
    for j in range(2):
        res = np.asarray(Image.open(d / "r" / f"img_{j:02d}.png"))
        assert (res[:, :4] == a[:, :4]).all()  # kept half: exactly the input
        assert not (res[:, 4:] == a[:, 4:]).all()  # generated half: not the input
    assert Image.open(d / "r" / "img_strip.png").size[0] > 4 * 8


@pytest.mark.parametrize("mask,expect_same", [("black.png", False), ("white.png", None)])
def test_all_black_mask_returns_input_and_all_white_is_sampling(files, mask, expect_same):
    d, a = files
    r = diffuse("inpaint", "--image", "img.png", "--mask", mask, *ORACLE, "inpaint.method=replace", "hydra.run.dir=r", cwd=d)
    assert r.returncode == 0, r.stderr
    res = np.asarray(Image.open(d / "r" / "img_00.png"))
    if mask == "black.png":  # black = keep everything: nothing to do
        assert (res == a).all() and "warning" in r.stderr
    else:
        assert not (res == a).any(axis=2).all()
