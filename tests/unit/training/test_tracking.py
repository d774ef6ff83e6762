"""Tracking (issue 18, parts 1-2): curves.png kept up to date from metrics.jsonl, the loggers (tensorboard, wandb),
and in-training evaluation (trainer.eval_every) scored as `diffuse eval` scores the same checkpoint.

Tiny runs on an 8x8 mixture; the feature extractor is a tiny U-Net checkpoint (metrics.features=checkpoint), as in
tests/commands/test_eval.py; the services are stood in for by modules that record their calls, and where the real packages
are installed (not in CI) their own files are read back: TensorBoard's event files, W&B's offline run file."""

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.checkpoint import load_checkpoint
from diffuse.errors import UserError
from diffuse.plot import _log_ticks
from diffuse.tasks import evaluate, train
from diffuse.training import curves, tracking
from tests.conftest import TINY_UNET, compose

pytestmark = pytest.mark.usefixtures("one_thread")

NET = TINY_UNET
TINY = [
    "dataset=gmm",
    "dataset.size=48",
    "model.ch=16",
    "model.ch_mult=[1]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "trainer.batch_size=8",
    "trainer.steps=6",
    "trainer.log_every=2",
    "trainer.ckpt_every=6",
    "trainer.warmup=2",
    "trainer.sample_n=4",
    "trainer.sample_steps=3",
    "trainer.sample_every=0",
    "trainer.ema_decay=0.9",
]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_in_training_fid_is_diffuse_evals_fid_and_leaves_the_run_as_it_was(feature_ckpt, tmp_path, capsys):
    fx = [
        "metrics.features=checkpoint",
        f"metrics.features_ckpt={feature_ckpt}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
    ]
    evald = ["trainer.eval_every=3", "trainer.eval_n=40", "trainer.eval_batch_size=16", *fx]
    train.run(compose("train", [*TINY, *evald]), tmp_path / "a")
    said = capsys.readouterr().out
    train.run(compose("train", TINY), tmp_path / "b")

    recs = records(tmp_path / "a")
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert all(r["eval"]["n"] == 40 and r["eval"]["features"] == "checkpoint" and r["eval"]["fid"] > 0 for r in evals)
    assert "warning: trainer.eval_n=40 is under 5x the 32 feature dimensions" in said
    # The evaluations draw from their own streams: the training is the same step for step, weights included.
    assert [r["loss"] for r in recs if "loss" in r] == [r["loss"] for r in records(tmp_path / "b")]
    ca, cb = (load_checkpoint(tmp_path / x / "checkpoints" / "last.safetensors") for x in "ab")
    assert all(torch.equal(ca.ema[k], cb.ema[k]) for k in ca.ema)

    # diffuse eval of the final checkpoint, with the same n, sampler, steps, seed and features: the same FID.
    res = evaluate.run(
        compose(
            "eval",
            [
                *fx,
                f"ckpt={tmp_path / 'a'}",
                "n=40",
                "steps=3",
                "seed=0",
                "batch_size=16",
                "dataset=gmm",
                "dataset.size=48",
            ],
        ),
        tmp_path / "ev",
    )
    assert res["metrics"]["fid"] == pytest.approx(evals[-1]["eval"]["fid"], rel=1e-4)

    img = Image.open(tmp_path / "a" / "curves.png")
    assert img.size == (880, 560)  # loss, lr, images/s and the FID panel
    assert Image.open(tmp_path / "b" / "curves.png").size == (1320, 280)  # no evaluation, no FID panel
    assert (tmp_path / "a" / "curves.png").stat().st_size < 100_000


def test_fid_without_inception_weights_is_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    train.run(
        compose("train", [*TINY, "trainer.steps=2", "trainer.eval_every=1", "metrics.download=false"]), tmp_path / "r"
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "eval_every" in ln]
    assert len(lines) == 1 and "no in-training evaluation" in lines[0] and "not available offline" in lines[0]
    assert [r["step"] for r in records(tmp_path / "r")] == [2]  # trained to the end, no eval record
    assert (tmp_path / "r" / "checkpoints" / "last.safetensors").is_file()


class FakeWriter:
    calls: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, step))

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_image(self, tag, img, step, dataformats):
        self.calls.append(("image", tag, tuple(img.shape), img.dtype, step, dataformats))

    def flush(self):
        pass

    def close(self):
        self.calls.append(("close",))


def test_tensorboard_gets_the_records_of_metrics_jsonl_and_the_sample_grid(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    FakeWriter.calls = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(tracking, "installed", lambda package: True)
    train.run(compose("train", [*TINY, "logger=tensorboard"]), tmp_path / "r")
    calls = FakeWriter.calls
    losses = {c[3]: c[2] for c in calls if c[:2] == ("scalar", "train/loss")}
    assert losses == {r["step"]: r["loss"] for r in records(tmp_path / "r")}
    assert {c[1] for c in calls if c[0] == "scalar"} == {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/skipped",
    }
    images = [c for c in calls if c[0] == "image"]
    assert len(images) == 1 and images[0][1] == "samples" and images[0][3] == torch.uint8 and images[0][4] == 6
    assert images[0][2][0] == 3 and images[0][5] == "CHW"
    assert calls[0][0] == "text" and calls[-1] == ("close",)


def test_a_logger_whose_package_is_missing_is_refused_before_training(monkeypatch):
    from diffuse.pipeline.config import to_dict
    from diffuse.training.config import check_config

    monkeypatch.setattr(tracking, "installed", lambda package: False)
    for name in ("tensorboard", "wandb"):
        with pytest.raises(
            UserError, match=rf"logger={name} needs the {name} package.*pip install 'diffuse\[{name}\]'"
        ):
            check_config(to_dict(compose("train", [f"logger={name}"])))
    monkeypatch.setattr(tracking, "installed", lambda package: True)
    with pytest.raises(UserError, match="logger.mode='sometimes' is not allowed"):
        tracking.check_logger({"name": "wandb", "mode": "sometimes"})
    with pytest.raises(UserError, match="logger='mlflow' is not allowed: choose one of none, tensorboard, wandb"):
        tracking.check_logger({"name": "mlflow"})


def test_wandb_goes_offline_without_network_and_keeps_its_run_id(tmp_path, monkeypatch, capsys):
    inits = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "installed", lambda package: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = {"name": "wandb", "project": "p", "mode": "auto"}
    monkeypatch.setattr(tracking, "reachable", lambda host, port, timeout=3.0: False)
    tracking.build_tracker(cfg, tmp_path, {"a": 1}, main=True)
    assert inits[-1]["mode"] == "offline" and "no network (api.wandb.ai:443" in capsys.readouterr().out
    monkeypatch.setattr(tracking, "reachable", lambda host, port, timeout=3.0: True)
    tracking.build_tracker(cfg, tmp_path, {"a": 1}, main=True)  # a resumed run: the same W&B run
    assert inits[-1]["mode"] == "online" and inits[-1]["id"] == inits[0]["id"] and inits[-1]["resume"] == "allow"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracking.build_tracker(cfg, tmp_path, {"a": 1}, main=True)
    assert inits[-1]["mode"] is None  # WANDB_MODE is wandb's own to read
    assert isinstance(tracking.build_tracker(cfg, tmp_path, {}, main=False), tracking.Tracker) and len(inits) == 3


def test_smoothing_and_log_ticks():
    trend = [0.5 * i - 3 for i in range(40)]
    assert curves.smooth(trend, 5) == pytest.approx(trend)  # centred: no lag, ends included
    noisy = [v + (-1) ** i for i, v in enumerate(trend)]
    assert max(abs(a - b) for a, b in zip(curves.smooth(noisy, 5)[5:-5], trend[5:-5])) <= 1 / 11 + 1e-9
    assert curves.smoothing_half_width(40) == 2 and curves.smoothing_half_width(5) == 1
    assert _log_ticks(0.01, 10) == pytest.approx([0.01, 0.1, 1, 10])
    assert _log_ticks(0.3, 4) == pytest.approx([0.5, 1, 2])
    assert all(1.05 <= t <= 1.09 for t in _log_ticks(1.05, 1.09)) and len(_log_ticks(1.05, 1.09)) >= 2


def test_curves_plot_loss_on_a_log_axis(tmp_path):
    """A loss falling tenfold every 100 steps is a straight line on the loss panel's log axis."""
    recs = [
        {"step": s, "loss": 10 ** (-s / 100), "lr": 1e-3, "images_per_s": 100.0, "skipped": 0}
        for s in range(10, 310, 10)
    ]
    curves.write_curves(recs, tmp_path / "c.png")
    a = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)[:, :440]
    ys, xs = np.nonzero(np.abs(a - (31, 119, 180)).sum(-1) == 0)  # the smoothed line's colour
    line = [(x, ys[xs == x].mean()) for x in np.unique(xs) if 100 < x < 280]  # left of the legend
    fit = np.polyfit([p[0] for p in line], [p[1] for p in line], 1)
    resid = max(abs(np.polyval(fit, x) - y) for x, y in line)
    assert fit[0] > 0 and resid < 6  # down the panel as the loss falls, straight within a few pixels


# The real packages (pip install 'diffuse[tensorboard]' / 'diffuse[wandb]'): skipped where they are not installed.


def test_real_tensorboard_events_are_metrics_jsonl_also_after_resuming_from_an_older_checkpoint(feature_ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fx = [
        "metrics.features=checkpoint",
        f"metrics.features_ckpt={feature_ckpt}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
    ]
    run = [
        *TINY,
        "logger=tensorboard",
        "trainer.ckpt_every=2",
        "trainer.sample_every=2",
        "trainer.eval_every=3",
        "trainer.eval_n=16",
        "trainer.eval_batch_size=16",
        *fx,
    ]
    out = tmp_path / "r"
    train.run(compose("train", run), out)
    # The newest checkpoints lost: the resumed run starts at step 2 and logs steps 4 and 6 (and the eval at 3) again.
    for name in ("step_0000004", "step_0000006", "last"):
        (out / "checkpoints" / f"{name}.safetensors").unlink()
    train.run(compose("train", [*run, "trainer.steps=8", "resume=true"]), out)

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    recs = records(out)
    logged = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    for key in ("loss", "lr", "images_per_s", "skipped"):
        events = ea.Scalars(f"train/{key}")  # each step once: the first run's 4 and 6 purged, as metrics.jsonl was cut
        assert [e.step for e in events] == [2, 4, 6, 8]
        assert [e.value for e in events] == pytest.approx([r[key] for r in logged], rel=1e-6)
    evals = [r for r in recs if "eval" in r]
    assert {"eval/fid", "eval/nfe", "eval/seconds"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("eval/fid")] == [r["step"] for r in evals] == [3, 6]
    assert [e.value for e in ea.Scalars("eval/fid")] == pytest.approx([r["eval"]["fid"] for r in evals], rel=1e-6)
    images = ea.Images("samples")
    assert [e.step for e in images] == [2, 4, 6, 8]
    tb = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
    disk = np.asarray(Image.open(out / "samples" / "step_0000008.png"))  # the same grid, upscaled for viewing
    assert tb.dtype == np.uint8 and np.array_equal(
        disk[:: disk.shape[0] // tb.shape[0], :: disk.shape[1] // tb.shape[1]], tb
    )
    assert [e.step for e in ea.Tensors("config/text_summary")] == [0, 2]


def _wandb_records(path: Path) -> list:
    """The records of an offline .wandb file: a 7-byte header, then 32 KiB blocks of chunks (4-byte checksum, 2-byte
    length, 1-byte kind: 1 whole, 2 first, 3 middle, 4 last), each record a protobuf `Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, out, pos, buf = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(buf))
    return out


def _wandb_history(path: Path) -> list[dict]:
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
        for rec in _wandb_records(path)
        if rec.WhichOneof("record_type") == "history"
    ]


def test_real_wandb_offline_run_holds_the_history_and_resume_keeps_its_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = [*TINY, "logger=wandb", "logger.mode=offline", "trainer.sample_every=3"]
    out = tmp_path / "r"
    train.run(compose("train", run), out)
    train.run(compose("train", [*run, "trainer.steps=8", "resume=true"]), out)
    wandb.teardown()  # run.finish() returns before wandb's service has written the run's last records (exit)

    run_id = (out / "wandb" / "run_id").read_text().strip()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))  # one per process, in start order
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}
    exits = [rec.exit.exit_code for f in files for rec in _wandb_records(f) if rec.WhichOneof("record_type") == "exit"]
    assert exits == [0, 0]  # each process finished its run
    with pytest.raises(UserError, match="non-finite"):  # diverged: stopped at the log check, exit code 3
        train.run(
            compose("train", [*run, "trainer.lr=1e30", "trainer.warmup=0", "trainer.max_nonfinite=2"]), tmp_path / "f"
        )
    wandb.teardown()
    [failed] = (tmp_path / "f" / "wandb").glob("offline-run-*/run-*.wandb")
    assert [rec.exit.exit_code for rec in _wandb_records(failed) if rec.WhichOneof("record_type") == "exit"] == [1]
    rows = [(f, row) for f in files for row in _wandb_history(f)]
    logged = [r for r in records(out) if "loss" in r]
    train_rows = [row for _, row in rows if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == [r["step"] for r in logged] == [2, 4, 6, 8]
    for key in ("loss", "lr", "images_per_s", "skipped"):
        assert [row[f"train/{key}"] for row in train_rows] == pytest.approx([r[key] for r in logged], rel=1e-12)
    grids = [(f, row) for f, row in rows if "samples/path" in row]
    assert [row["_step"] for _, row in grids] == [3, 6, 8]
    for f, row in grids:
        logged_png = np.asarray(Image.open(f.parent / "files" / row["samples/path"]))
        disk = np.asarray(Image.open(out / "samples" / f"step_{row['_step']:07d}.png"))
        assert np.array_equal(
            disk[:: disk.shape[0] // logged_png.shape[0], :: disk.shape[1] // logged_png.shape[1]], logged_png
        )
