"""Resume from the newest valid checkpoint, keep-K, and the non-finite step guard, in process."""

import json
from pathlib import Path

import pytest
import torch

from diffuse.checkpoint import load_checkpoint, load_newest_valid, numbered_checkpoints
from diffuse.errors import RunStopped, UserError
from diffuse.tasks import train as train_task
from diffuse.training import loop as loop_module
from diffuse.training import objectives as objectives_module

SMALL = [
    "dataset.size=64",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=8",
    "trainer.log_every=1",
    "trainer.sample_n=0",
    "trainer.warmup=2",
    "trainer.lr=2e-3",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(compose_cfg, out, *extra):
    return train_task.run(compose_cfg("train", SMALL + list(extra)), out)


def _same_state(a, b):
    for part in ("model", "ema"):
        for k, v in getattr(a, part).items():
            if not torch.equal(v, getattr(b, part)[k]):
                return False
    return all(torch.equal(v, b.optim["state"][i][k]) for i, st in a.optim["state"].items() for k, v in st.items())


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":  # a byte of tensor data: the header reads, the hash does not match
        data[-10] ^= 0xFF
    else:  # cut short: the header promises bytes that are not there
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


def test_resume_passes_over_damaged_checkpoints_to_the_newest_valid(compose_cfg, tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    common = ["trainer.ckpt_every=2", "trainer.keep=2"]
    _train(compose_cfg, straight, "trainer.steps=7", *common)
    _train(compose_cfg, run, "trainer.steps=6", *common)
    ck = run / "checkpoints"
    assert [p.name for p in numbered_checkpoints(ck)] == ["step_0000004.safetensors", "step_0000006.safetensors"]
    _damage(ck / "last.safetensors", "flip")
    _damage(ck / "step_0000006.safetensors", "truncate")
    capsys.readouterr()
    _train(compose_cfg, run, "trainer.steps=7", "resume=true", *common)
    err = capsys.readouterr()
    warnings = [ln for ln in err.err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, err.err
    assert "last.safetensors" in warnings[0] and "hash mismatch" in warnings[0] and "step_0000004" in warnings[0]
    assert "step_0000006.safetensors" in warnings[1]
    assert "resumed from" in err.out and "step_0000004.safetensors at step 4" in err.out
    # Steps 5..7 replayed from step 4 land exactly where 7 straight steps do; the damaged step 6 was rewritten.
    a, b = load_checkpoint(straight / "checkpoints" / "last.safetensors"), load_checkpoint(ck / "last.safetensors")
    assert a.step == b.step == 7 and _same_state(a, b)
    assert [p.name for p in numbered_checkpoints(ck)] == ["step_0000006.safetensors", "step_0000007.safetensors"]
    assert load_checkpoint(ck / "step_0000006.safetensors").step == 6
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 7  # steps 5-6 logged once, not twice


def test_no_valid_checkpoint_is_one_error(tmp_path, compose_cfg):
    run = tmp_path / "run"
    _train(compose_cfg, run, "trainer.steps=2", "trainer.ckpt_every=1", "trainer.keep=5")
    for p in (run / "checkpoints").iterdir():
        _damage(p, "truncate")
    with pytest.raises(UserError, match="no valid checkpoint") as e:
        load_newest_valid(run / "checkpoints")
    assert "\n" not in str(e.value) and "last.safetensors" in str(e.value) and "step_0000001" in str(e.value)
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_newest_valid(tmp_path / "empty")


def test_keep_k_counts_the_newest_and_last_matches_the_newest(tmp_path, compose_cfg):
    out = tmp_path / "k2"
    _train(compose_cfg, out, "trainer.steps=9", "trainer.ckpt_every=2", "trainer.keep=2")
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [
        "last.safetensors",
        "step_0000008.safetensors",
        "step_0000009.safetensors",
    ]
    last, newest = load_checkpoint(ck / "last.safetensors"), load_checkpoint(ck / "step_0000009.safetensors")
    assert last.step == 9 and _same_state(last, newest)
    out0 = tmp_path / "k0"
    _train(compose_cfg, out0, "trainer.steps=3", "trainer.ckpt_every=1", "trainer.keep=0")
    assert [p.name for p in (out0 / "checkpoints").iterdir()] == ["last.safetensors"]


def test_numbered_checkpoints_sort_by_step_not_by_name(tmp_path):
    for step in (9_999_999, 10_000_000, 123):
        (tmp_path / f"step_{step:07d}.safetensors").touch()
    (tmp_path / ".step_0000005.safetensors.abc.tmp").touch()  # a killed write's temp file is not a checkpoint
    assert [p.name for p in numbered_checkpoints(tmp_path)] == [
        "step_0000123.safetensors",
        "step_9999999.safetensors",
        "step_10000000.safetensors",
    ]


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _inject(monkeypatch, bad: dict):
    """The training loss of call i (= step i + 1) made NaN (bad[i] == 'nan') or given infinite gradients."""
    calls = []
    real = objectives_module.diffusion_loss

    def loss(*a, **k):
        out = real(*a, **k)
        kind = bad.get(len(calls))
        calls.append(kind)
        if kind == "nan":
            return out * float("nan")
        if kind == "inf_grad":
            return _InfGrad.apply(out)
        return out

    monkeypatch.setattr(objectives_module, "diffusion_loss", loss)
    return calls


@pytest.mark.parametrize("grad_clip", [1.0, 0])  # the check reads the clip's norm, or computes one
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, compose_cfg, monkeypatch, grad_clip):
    _inject(monkeypatch, {2: "nan", 3: "inf_grad"})  # steps 3 and 4
    out = tmp_path / "run"
    _train(
        compose_cfg, out, "trainer.steps=6", "trainer.ckpt_every=1", "trainer.keep=10", f"trainer.grad_clip={grad_clip}"
    )
    ck = {s: load_checkpoint(out / "checkpoints" / f"step_{s:07d}.safetensors") for s in range(2, 6)}
    assert _same_state(ck[2], ck[3]) and _same_state(ck[2], ck[4])  # no weight, EMA or moment moved
    assert not _same_state(ck[4], ck[5])  # and training goes on after them
    assert not torch.equal(ck[2].rng["data"], ck[3].rng["data"])  # the skipped steps still drew their batches
    assert ck[4].extra == {"skipped": 2, "nonfinite_run": 2} and ck[5].extra == {"skipped": 2, "nonfinite_run": 0}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [0, 0, 1, 1, 0, 0]
    assert all(r["loss"] == r["loss"] for r in recs[:2] + recs[4:])


def test_skipped_steps_resume_exactly(tmp_path, compose_cfg, monkeypatch):
    """A skip inside the first half: 3 + 3 resumed steps equal 6 straight ones, counters included."""
    _inject(monkeypatch, {1: "nan"})
    _train(compose_cfg, tmp_path / "straight", "trainer.steps=6", "trainer.ckpt_every=100")
    _inject(monkeypatch, {1: "nan"})
    _train(compose_cfg, tmp_path / "halves", "trainer.steps=3", "trainer.ckpt_every=100")
    _inject(monkeypatch, {})
    _train(compose_cfg, tmp_path / "halves", "trainer.steps=6", "trainer.ckpt_every=100", "resume=true")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    b = load_checkpoint(tmp_path / "halves" / "checkpoints" / "last.safetensors")
    assert _same_state(a, b) and a.extra == b.extra == {"skipped": 1, "nonfinite_run": 0}


def test_too_many_nonfinite_in_a_row_stops_and_keeps_the_last_good_checkpoint(tmp_path, compose_cfg, monkeypatch):
    _inject(monkeypatch, {i: "nan" for i in range(2, 100)})
    out = tmp_path / "run"
    with pytest.raises(RunStopped) as e:
        _train(compose_cfg, out, "trainer.steps=50", "trainer.ckpt_every=2", "trainer.max_nonfinite=3")
    msg = str(e.value)
    assert "step 5" in msg and "3 steps in a row" in msg and "max_nonfinite=3" in msg and "step_0000004" not in msg
    assert "last.safetensors (step 4)" in msg and "\n" not in msg
    ck = out / "checkpoints"
    assert load_checkpoint(ck / "last.safetensors").step == 4
    assert _same_state(load_checkpoint(ck / "step_0000002.safetensors"), load_checkpoint(ck / "last.safetensors"))
    assert e.value.exit_code == 3 and e.value.keep_outputs


def test_bf16_autocast_keeps_the_schedule_math_in_float32():
    """Under autocast the q(x_t|x_0) coefficients, x_t and the loss weights stay float32+ and equal to fp32's."""
    from diffuse.diffusion.objectives import loss_weight
    from diffuse.diffusion.schedule import coefficients, make_schedule, q_sample

    s = make_schedule("cosine")
    x0, eps = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ref = q_sample(s, x0, t, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, sg = coefficients(s, t, x0)
        xt = q_sample(s, x0, t, eps)
        w = loss_weight(s, t, "v", "min_snr")
        lin = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    assert lin.dtype == torch.bfloat16  # autocast is really on
    assert a.dtype == sg.dtype == xt.dtype == torch.float32 and w.dtype == torch.float64
    assert torch.equal(xt, ref)
    # A network's bf16 output becomes eps in the sampler's float32, with float32 coefficients.
    from diffuse.diffusion.prediction import NetworkDenoiser

    conv = torch.nn.Conv2d(3, 3, 1)
    eps = NetworkDenoiser(lambda x, t, y: conv(x), "v", s, autocast_dtype=torch.bfloat16)(xt, t)
    assert eps.dtype == torch.float32
    # 1 - alpha_bar at t=0 is ~4e-5: bf16 (8 bits of mantissa) would put sqrt(alpha_bar) at exactly 1.0.
    assert a[0].item() != 1.0 and abs(a[0].item() - (1 - 1e-4) ** 0.5) < 1e-3


ORACLE = ["model=oracle", "dataset=gmm", "steps=5", "batch_size=2", "save_npz=true"]


def test_sample_resume_skips_complete_images_and_gives_the_uninterrupted_set(tmp_path, compose_cfg, monkeypatch):
    import numpy as np

    from diffuse.tasks import sample as sample_task

    straight, part = tmp_path / "straight", tmp_path / "part"
    sample_task.run(compose_cfg("sample", ORACLE + ["n=6"]), straight)
    sample_task.run(compose_cfg("sample", ORACLE + ["n=4"]), part)  # "interrupted" after 4 images
    images = part / "images"
    (images / "000001.png").unlink()
    data = (images / "000002.png").read_bytes()
    (images / "000002.png").write_bytes(data[: len(data) // 2])  # not complete: drawn again
    (images / ".000004.png.x1y2.tmp").write_bytes(b"\x89PNG half")  # a killed write's temp file
    untouched = (images / "000000.png").stat().st_mtime_ns
    written = []
    real = sample_task.save_png
    monkeypatch.setattr(
        sample_task, "save_png", lambda img, path, **k: (written.append(Path(path).name), real(img, path, **k))
    )
    sample_task.run(compose_cfg("sample", ORACLE + ["n=6", "resume=true"]), part)
    assert sorted(w for w in written if w != "grid.png") == ["000001.png", "000002.png", "000004.png", "000005.png"]
    assert (images / "000000.png").stat().st_mtime_ns == untouched
    assert sorted(p.name for p in images.iterdir()) == [f"{i:06d}.png" for i in range(6)]  # temp file gone
    for i in range(6):
        assert (images / f"{i:06d}.png").read_bytes() == (straight / "images" / f"{i:06d}.png").read_bytes()
    assert np.array_equal(np.load(part / "samples.npz")["arr_0"], np.load(straight / "samples.npz")["arr_0"])
    assert (part / "grid.png").read_bytes() == (straight / "grid.png").read_bytes()


def test_sample_resume_refuses_a_run_dir_of_other_images(tmp_path, compose_cfg):
    from diffuse.tasks import sample as sample_task

    sample_task.run(compose_cfg("sample", ORACLE + ["n=2"]), tmp_path)
    with pytest.raises(UserError, match="seed=0 and this run seed=1"):
        sample_task.run(compose_cfg("sample", ORACLE + ["n=2", "seed=1", "resume=true"]), tmp_path)
    with pytest.raises(UserError, match="needs save_images=true"):
        sample_task.run(compose_cfg("sample", ORACLE + ["n=2", "save_images=false", "resume=true"]), tmp_path)


def test_disk_full_while_logging_is_one_line_and_keeps_the_checkpoints(compose_cfg, tmp_path, monkeypatch):
    """metrics.jsonl is appended at each log step: a full disk there stops the run with one line (exit 2 from the
    CLI) naming the file and the checkpoint to resume from, and removes nothing the run wrote before."""
    import builtins
    import errno

    real_open = builtins.open

    class FullAfter:
        def __init__(self, f, n):
            self.f, self.n = f, n

        def write(self, text):
            self.n -= 1
            if self.n < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullAfter(f, 3) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(loop_module, "open", fake_open, raising=False)
    with pytest.raises(UserError) as e:
        _train(compose_cfg, tmp_path, "trainer.steps=6", "trainer.ckpt_every=2")
    msg = str(e.value)
    assert "\n" not in msg and "metrics.jsonl: No space left on device" in msg and "step 4" in msg, msg
    assert getattr(e.value, "keep_outputs", False)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert ckpt.step == 2 and "resume from " in msg and "checkpoints/" in msg
