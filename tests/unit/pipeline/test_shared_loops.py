"""The loops the commands share: per image (inpaint, edit, upsample), per batch (sample, eval, cascades), and the
samples.npz they write."""

import json

import numpy as np
import torch

from diffuse.images import read_npz, read_png, write_npz
from diffuse.pipeline.sampling import in_batches
from diffuse.rundir.per_image import each_image, write_record


class Stop:
    """A stop request that turns on after `after` looks (the real one turns on at a signal)."""

    def __init__(self, after: int | None = None):
        self.looks, self.after, self.signum = 0, after, None

    @property
    def requested(self) -> bool:
        self.looks += 1
        return self.after is not None and self.looks > self.after

    def line(self, what: str) -> str:
        return f"stopped by signal (SIGTERM): {what}"


def _results(i: int, n: int = 2) -> torch.Tensor:
    return torch.full((n, 3, 4, 4), 10 * i + 1, dtype=torch.uint8)


def test_each_image_writes_every_result_and_keeps_one_entry_per_image(tmp_path):
    paths = [tmp_path / "in" / "a.png", tmp_path / "in" / "b.jpg"]
    kept = each_image(paths, 2, lambda i: (_results(i), f"kept {i}"), tmp_path, Stop())
    assert kept == ["kept 0", "kept 1"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a_00.png", "a_01.png", "b_00.png", "b_01.png"]
    assert torch.equal(read_png(tmp_path / "b_01.png"), _results(1)[1])


def test_each_image_stops_between_images_and_the_record_lists_the_rest(tmp_path, capsys):
    paths = [tmp_path / f"{k}.png" for k in "abc"]
    kept = each_image(paths, 2, lambda i: (_results(i), i), tmp_path, Stop(after=1), progress="working")
    assert kept == [0] and sorted(p.name for p in tmp_path.glob("*.png")) == ["a_00.png", "a_01.png"]
    info = {"images": ["a"]}
    stopped = write_record(tmp_path, "thing.json", info, paths, len(kept), Stop(), "image(s) done, in")
    assert stopped == {"images": ["a"], "not_done": [str(paths[1]), str(paths[2])], "stopped": True}
    assert json.loads((tmp_path / "thing.json").read_text()) == {k: v for k, v in stopped.items() if k != "stopped"}
    out = capsys.readouterr().out
    assert "working" in out  # the progress bar
    assert (
        f"stopped by signal (SIGTERM): 1 of 3 image(s) done, in {tmp_path}; the other 2 are listed in thing.json "
        "(not_done): run again on them"
    ) in " ".join(out.split())


def test_a_complete_record_has_no_not_done_and_prints_nothing(tmp_path, capsys):
    paths = [tmp_path / "a.png"]
    assert write_record(tmp_path, "thing.json", {"n": 1}, paths, 1, Stop(), "image(s) done, in") is None
    assert json.loads((tmp_path / "thing.json").read_text()) == {"n": 1}
    assert capsys.readouterr().out == ""


def test_write_npz_is_what_read_npz_reads(tmp_path):
    u8 = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_npz(tmp_path / "samples.npz", u8, torch.tensor([2, 0, 1], dtype=torch.int32))
    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].shape == (3, 5, 4, 3) and z["arr_1"].dtype == np.int64 and z["arr_1"].tolist() == [2, 0, 1]
    assert torch.equal(read_npz(tmp_path / "samples.npz").array, u8)
    write_npz(tmp_path / "plain.npz", u8[:1])
    with np.load(tmp_path / "plain.npz") as z:
        assert z.files == ["arr_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.npz", "samples.npz"]  # no temp file left


def test_in_batches_draws_in_order_counts_the_first_batch_and_stops_between_batches():
    seen, drawn = [], []

    def draw(start, idx):
        drawn.append((start, list(idx)))
        return torch.tensor(idx, dtype=torch.float64)[:, None], 10 + start  # moved to float32 by the loop

    out = in_batches(draw, [5, 6, 7, 8, 9], 2, "x", (1,), lambda s, x: seen.append((s, x)), False, True, None)
    assert drawn == [(0, [5, 6]), (2, [7, 8]), (4, [9])] and [s for s, _ in seen] == [0, 2, 4]
    assert out.images.dtype == torch.float32 and out.images[:, 0].tolist() == [5, 6, 7, 8, 9]
    assert out.nfe == 10 and not out.stopped
    drawn.clear()
    out = in_batches(draw, [5, 6, 7, 8, 9], 2, "x", (1,), None, False, False, Stop(after=1))
    assert drawn == [(0, [5, 6])] and out.stopped and out.images.shape == (0, 1)
