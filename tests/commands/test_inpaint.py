"""diffuse inpaint in a subprocess with the mixture oracle: outputs, exact known pixels (bad input: test_bad_input.py)."""

import numpy as np
import pytest
from PIL import Image

from tests.helpers import diffuse

ORACLE = ["model=oracle", "dataset=gmm", "steps=10", "inpaint.resamples=2", "inpaint.jump_length=5"]


@pytest.fixture
def files(tmp_path):
    a = (np.random.RandomState(0).rand(8, 8, 3) * 255).astype("uint8")
    Image.fromarray(a).save(tmp_path / "img.png")
    m = np.zeros((8, 8), "uint8")
    m[:, 4:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((8, 8), "uint8")).save(tmp_path / "black.png")
    Image.fromarray(np.full((8, 8), 255, "uint8")).save(tmp_path / "white.png")
    return tmp_path, a


@pytest.mark.subprocess
def test_inpaint_oracle_keeps_known_pixels_exactly(files):
    d, a = files
    r = diffuse("inpaint", "--image", "img.png", "--mask", "mask.png", *ORACLE, "n=2", "hydra.run.dir=r", cwd=d)
    assert r.returncode == 0, r.stderr
    for j in range(2):
        res = np.asarray(Image.open(d / "r" / f"img_{j:02d}.png"))
        assert (res[:, :4] == a[:, :4]).all()  # kept half: exactly the input
        assert not (res[:, 4:] == a[:, 4:]).all()  # generated half: not the input
    assert Image.open(d / "r" / "img_strip.png").size[0] > 4 * 8


@pytest.mark.subprocess
@pytest.mark.parametrize("mask,expect_same", [("black.png", False), ("white.png", None)])
def test_all_black_mask_returns_input_and_all_white_is_sampling(files, mask, expect_same):
    d, a = files
    r = diffuse(
        "inpaint", "--image", "img.png", "--mask", mask, *ORACLE, "inpaint.method=replace", "hydra.run.dir=r", cwd=d
    )
    assert r.returncode == 0, r.stderr
    res = np.asarray(Image.open(d / "r" / "img_00.png"))
    if mask == "black.png":  # black = keep everything: nothing to do
        assert (res == a).all() and "warning" in r.stderr
    else:
        assert not (res == a).any(axis=2).all()


def _img(path, arr):
    Image.fromarray(arr).save(path)
    return arr


@pytest.mark.subprocess
def test_folders_grey_mask_invert_and_resize_in_one_run(tmp_path):
    """--image and --mask folders with matching names, mask_invert=true, a grey-valued mask (binarised at 50%,
    with a warning) and an image of another size (resized to the model's 8x8 and the result resized back)."""
    rs = np.random.RandomState(1)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    a = _img(tmp_path / "imgs" / "a.png", (rs.rand(8, 8, 3) * 255).astype("uint8"))
    big = _img(tmp_path / "imgs" / "big.png", (rs.rand(12, 16, 3) * 255).astype("uint8"))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, and not read")
    grey = np.full((8, 8), 200, "uint8")
    grey[:, 4:] = 60  # inverted: >= 128 (left) kept, < 128 (right) generated
    _img(tmp_path / "masks" / "a.png", grey)
    m = np.full((12, 16), 255, "uint8")
    m[4:9, 5:12] = 0  # inverted: the black box is generated
    _img(tmp_path / "masks" / "big.png", m)
    r = diffuse(
        "inpaint",
        "--image",
        "imgs",
        "--mask",
        "masks",
        *ORACLE,
        "inpaint.mask_invert=true",
        "hydra.run.dir=r",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "warning: mask masks/a.png has grey values; binarised at 50%" in r.stderr
    out = tmp_path / "r"
    res_a = np.asarray(Image.open(out / "a_00.png"))
    assert (res_a[:, :4] == a[:, :4]).all() and not (res_a[:, 4:] == a[:, 4:]).all()
    res_big = np.asarray(Image.open(out / "big_00.png"))
    assert res_big.shape == big.shape  # back at the input's size
    keep = m == 255
    assert (res_big[keep] == big[keep]).all() and not (res_big[~keep] == big[~keep]).all()
    assert sorted(p.name for p in out.glob("*.png")) == ["a_00.png", "a_strip.png", "big_00.png", "big_strip.png"]


@pytest.fixture
def oracle_cfg(compose_cfg):
    def make(image, mask, *extra):
        return compose_cfg("inpaint", [f"image={image}", f"mask={mask}", *ORACLE, *extra])

    return make


def test_folder_of_images_with_one_mask(files, oracle_cfg):
    from diffuse.tasks import inpaint as inpaint_task

    d, a = files
    (d / "many").mkdir()
    imgs = [_img(d / "many" / f"{k}.png", np.roll(a, i, axis=1)) for i, k in enumerate(("p", "q"))]
    info = inpaint_task.run(oracle_cfg(d / "many", d / "mask.png", "inpaint.method=replace"), d / "out")
    assert [p.split("/")[-1] for p in info["images"]] == ["p.png", "q.png"] and info["nfe"] == 10
    for k, img in zip(("p", "q"), imgs):
        res = np.asarray(Image.open(d / "out" / f"{k}_00.png"))
        assert (res[:, :4] == img[:, :4]).all() and not (res[:, 4:] == img[:, 4:]).all()


def _refused(cfg, out, needle):
    from diffuse.errors import UserError
    from diffuse.tasks import inpaint as inpaint_task

    with pytest.raises(UserError) as e:
        inpaint_task.run(cfg, out)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    assert not out.exists()  # refused before anything is written


def test_bad_folders_sizes_and_files_are_refused(files, oracle_cfg):
    """One line naming the file and what is allowed (the CLI prints it as `error: ...`, exit 2: tests/contracts/test_bad_input.py)."""
    d, a = files
    (d / "imgs").mkdir()
    (d / "masks").mkdir()
    for name in ("one.png", "two.png"):
        _img(d / "imgs" / name, a)
    Image.open(d / "mask.png").save(d / "masks" / "one.png")
    _refused(oracle_cfg(d / "imgs", d / "masks"), d / "o1", "no mask named two.png")
    _img(d / "big.png", np.zeros((16, 16, 3), "uint8"))
    _img(d / "bigmask.png", np.zeros((16, 16), "uint8"))
    _refused(oracle_cfg(d / "big.png", d / "bigmask.png", "inpaint.resize=false"), d / "o2", "inpaint.resize=true")
    (d / "cut.png").write_bytes((d / "img.png").read_bytes()[:60])  # a truncated PNG: unreadable
    _refused(oracle_cfg(d / "cut.png", d / "mask.png"), d / "o3", "cut.png is not a readable image")
    (d / "notes.txt").write_text("hello")
    _refused(oracle_cfg(d / "notes.txt", d / "mask.png"), d / "o4", "notes.txt is not a readable image")
    _refused(
        oracle_cfg(d / "img.png", d / "mask.png", "inpaint.method=conditioned"),
        d / "o5",
        "objective.mask_training=true",
    )
    _refused(oracle_cfg(d / "img.png", d / "mask.png", "inpaint.jump_last=2"), d / "o6", "inpaint.jump_last=2")
    _refused(oracle_cfg(d / "img.png", d / "mask.png", "sampler=euler"), d / "o7", "cannot drive repaint")


def test_methods_are_a_config_group(files, compose_cfg):
    """inpaint=replace|repaint|conditioned picks the method and its options; repaint's options belong to it."""
    from diffuse.tasks import inpaint as inpaint_task

    d, a = files

    def cfg(*extra):
        return compose_cfg(
            "inpaint", [f"image={d / 'img.png'}", f"mask={d / 'mask.png'}", "model=oracle", "steps=10", *extra]
        )

    info = inpaint_task.run(cfg("inpaint=replace", "sampler=dpm_solver"), d / "rep")
    assert info["method"] == "replace" and info["nfe"] == 10 and "jump_length" not in info
    res = np.asarray(Image.open(d / "rep" / "img_00.png"))
    assert (res[:, :4] == a[:, :4]).all() and not (res[:, 4:] == a[:, 4:]).all()
    info = inpaint_task.run(cfg("inpaint=repaint", "inpaint.resamples=2"), d / "rp")
    assert info["method"] == "repaint" and (info["jump_length"], info["resamples"], info["jump_last"]) == (5, 2, 0.2)
    assert info["nfe"] == 10 + 5  # jump points: level 1 only (6 > 0.2 * 10), walked twice, 5 steps each
    _refused(cfg("inpaint=replace", "inpaint.method=repaint"), d / "o", "choose the method with inpaint=repaint")
