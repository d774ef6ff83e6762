"""Fuzz the image and mask readers the commands use (images.open_image / load_image_and_mask, the folder dataset's
read_folder) with random bytes and damaged images of many modes and formats: every input loads as a valid
tensor or is refused with a UserError, never another exception. bench/fuzz_readers.py runs many more."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffuse.data.folder import read_folder
from diffuse.errors import UserError
from diffuse.images import load_image_and_mask, open_image

# (mode, format, extension): what people hand to an image reader.
KINDS = [
    ("L", "PNG", ".png"),
    ("RGB", "PNG", ".png"),
    ("RGBA", "PNG", ".png"),
    ("P", "PNG", ".png"),
    ("I;16", "PNG", ".png"),
    ("LA", "PNG", ".png"),
    ("1", "PNG", ".png"),
    ("RGB", "JPEG", ".jpg"),
    ("L", "JPEG", ".jpg"),
    ("RGB", "WEBP", ".webp"),
    ("RGBA", "WEBP", ".webp"),
    ("P", "GIF", ".gif"),
    ("RGB", "BMP", ".bmp"),
    ("F", "TIFF", ".tiff"),
    ("I;16", "TIFF", ".tiff"),
    ("CMYK", "JPEG", ".jpg"),
]


def encode(mode: str, fmt: str, w: int, h: int, seed: int) -> bytes:
    rgb = np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype("uint8")
    if mode == "I;16":
        im = Image.fromarray(rgb[..., 0].astype("uint16") * 257)
    elif mode == "F":
        im = Image.fromarray(rgb[..., 0].astype("float32") / 255)
    elif mode == "P":
        im = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE)
    else:
        im = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_files(draw):
    """(bytes, extension): random bytes, or an encoded image cut short, with bytes flipped or spliced in."""
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter: plain random bytes, under a plausible name
        return draw(st.binary(max_size=600)), draw(st.sampled_from([".png", ".jpg", ".webp", ".tiff"]))
    mode, fmt, ext = draw(st.sampled_from(KINDS))
    data = bytearray(encode(mode, fmt, draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(0, 99))))
    how = draw(st.sampled_from(["intact", "truncate", "flip", "splice"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data), ext


def check_readers(data: bytes, ext: str, tmp: Path) -> dict:
    """Run every reader on one file; returns how each ended ("loaded" or "refused"), raising on anything else
    or on a loaded result that is not a valid tensor."""
    folder = tmp / "folder"
    folder.mkdir(exist_ok=True)
    path = folder / f"input{ext}"
    path.write_bytes(data)
    outcome = {}
    for name, mode, mask in (("image_rgb", "RGB", False), ("image_grey", "L", False), ("mask", "L", True)):
        try:
            im = open_image(path, mode, mask=mask)
        except UserError as e:
            assert "\n" not in str(e)
            outcome[name] = "refused"
        else:
            assert im.mode == mode and im.size[0] >= 1 and im.size[1] >= 1
            outcome[name] = "loaded"
    try:
        img, keep = load_image_and_mask(path, path, (3, 8, 8), resize=True, invert=False)
    except UserError:
        outcome["load_pair"] = "refused"
    else:
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and keep.dtype == torch.bool
        assert keep.shape == (1, *img.shape[1:])
        outcome["load_pair"] = "loaded"
    # The same file as image and mask: read as both or refused.
    both = outcome["image_rgb"] == outcome["mask"] == "loaded"
    assert outcome["load_pair"] == ("loaded" if both else "refused"), outcome
    try:
        images, labels, _ = read_folder(folder, 8, report=lambda line: None)
    except UserError:
        outcome["read_folder"] = "refused"
    else:
        assert images.dtype == torch.uint8 and images.shape == (1, 3, 8, 8) and labels.tolist() == [0]
        outcome["read_folder"] = "loaded"
    path.unlink()
    return outcome


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about damaged TIFF tags; the outcome is what counts
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_files())
def test_readers_load_or_refuse_any_bytes(case):
    data, ext = case
    with tempfile.TemporaryDirectory() as tmp:
        check_readers(data, ext, Path(tmp))


def test_intact_images_of_every_kind_load():
    """The fuzz's starting points are real images: each loads (float images and nothing else are refused)."""
    with tempfile.TemporaryDirectory() as tmp:
        for mode, fmt, ext in KINDS:
            got = check_readers(encode(mode, fmt, 7, 5, 0), ext, Path(tmp))
            expect = "refused" if mode == "F" else "loaded"
            assert got["image_rgb"] == got["image_grey"] == expect, (mode, fmt, got)
            grey = mode in ("L", "LA", "1", "I;16")  # a mask must be black and white, not coloured
            assert got["mask"] == ("loaded" if grey else "refused"), (mode, fmt, got)
            assert got["read_folder"] == (
                "refused" if mode == "F" or ext not in (".png", ".jpg", ".webp") else "loaded"
            ), (mode, fmt, got)
