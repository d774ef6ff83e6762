"""SIGTERM/SIGINT in every command, in process: the signal is raised from inside a monkeypatched step or batch, so
it lands where the test means it to; the process's real handler takes it. Two subprocess tests send a real SIGTERM
to `diffuse sample` and `diffuse eval`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffuse.checkpoint import load_checkpoint, save_checkpoint
from diffuse.errors import UserError
from diffuse.metrics.extraction import FeatureStore
from diffuse.metrics.likelihood import scoring
from diffuse.scoring import evaluation
from diffuse.signals import Stopped, StopRequest
from diffuse.tasks import evaluate, inpaint, sample
from diffuse.tasks import train as train_task
from diffuse.training import objectives as objectives_module
from diffuse.training import trainer as trainer_module
from tests.conftest import compose
from tests.helpers import raise_sigterm, stop_at_batch

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "dataset.size=64",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=8",
    "trainer.sample_n=0",
    "trainer.warmup=5",
    "trainer.lr=2e-3",
    "trainer.ckpt_every=100",
]


def records(out: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["lr"], r["skipped"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def same_state(a, b) -> bool:
    return all(
        torch.equal(v, getattr(b, part)[k]) for part in ("model", "ema", "rng") for k, v in getattr(a, part).items()
    )


def _train(out, *extra):
    return train_task.run(compose("train", SMALL + list(extra)), out)


def _stop_after(monkeypatch, step, nan_at=()):
    """Trainer.train_step that raises SIGTERM right after step `step`; the steps in nan_at get a NaN loss (and so
    are skipped, as a real non-finite step is)."""
    real_step, real_loss = trainer_module.Trainer.train_step, objectives_module.diffusion_loss
    taking = []

    def diffusion_loss(*a, **k):
        out = real_loss(*a, **k)
        return out * float("nan") if taking[-1] in nan_at else out

    def train_step(self):
        taking.append(self.step + 1)
        loss = real_step(self)
        if self.step == step:
            raise_sigterm()
        return loss

    monkeypatch.setattr(objectives_module, "diffusion_loss", diffusion_loss)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)


def test_metrics_after_a_stop_and_resume_match_a_straight_run(tmp_path, monkeypatch, capsys):
    """12 steps, log_every=4: SIGTERM after step 6 (inside an interval), then resume=true; the records are the
    straight run's, the loss of the interval 5-8 included (its steps 5 and 6 ran before the stop)."""
    _train(tmp_path / "straight", "trainer.steps=12", "trainer.log_every=4")
    run = tmp_path / "run"
    _stop_after(monkeypatch, 6)
    capsys.readouterr()
    result = _train(run, "trainer.steps=12", "trainer.log_every=4")
    out = capsys.readouterr().out
    assert result["stopped"] and result["step"] == 6
    assert (
        "stopped by signal (SIGTERM): step 6 of 12" in out
        and f"continue with: diffuse train resume=true hydra.run.dir={run.resolve()}" in out
    )
    assert [r[0] for r in records(run)] == [4]  # nothing partial was logged
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").extra["interval"]["losses"][1] is not None
    monkeypatch.undo()
    _train(run, "trainer.steps=12", "trainer.log_every=4", "resume=true")
    assert records(run) == records(tmp_path / "straight")
    assert same_state(
        load_checkpoint(run / "checkpoints" / "last.safetensors"),
        load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors"),
    )


def test_skipped_steps_of_an_interval_survive_the_stop(tmp_path, monkeypatch):
    """A non-finite loss at step 5, before a stop at step 6: the resumed record at step 8 still counts it."""
    nan_at = (5,)
    _stop_after(monkeypatch, None, nan_at)
    _train(tmp_path / "straight", "trainer.steps=8", "trainer.log_every=4")
    _stop_after(monkeypatch, 6, nan_at)
    _train(tmp_path / "run", "trainer.steps=8", "trainer.log_every=4")
    _stop_after(monkeypatch, None)
    _train(tmp_path / "run", "trainer.steps=8", "trainer.log_every=4", "resume=true")
    straight = records(tmp_path / "straight")
    assert straight[1][3] == 1 and records(tmp_path / "run") == straight


def test_a_signal_while_the_network_is_built_stops_at_step_0_and_resumes(tmp_path, monkeypatch, capsys):
    real = trainer_module.build_network

    def build(cfg):
        raise_sigterm()  # before the loop, before the network even exists
        return real(cfg)

    monkeypatch.setattr(trainer_module, "build_network", build)
    run = tmp_path / "run"
    result = _train(run, "trainer.steps=4", "trainer.log_every=2")
    assert result == {"step": 0, "loss": result["loss"], "stopped": True}
    assert "stopped by signal (SIGTERM): step 0 of 4" in capsys.readouterr().out
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").step == 0 and (run / "config.yaml").is_file()
    monkeypatch.undo()
    assert _train(run, "trainer.steps=4", "trainer.log_every=2", "resume=true")["step"] == 4
    _train(tmp_path / "straight", "trainer.steps=4", "trainer.log_every=2")
    assert records(run) == records(tmp_path / "straight")
    assert same_state(
        load_checkpoint(run / "checkpoints" / "last.safetensors"),
        load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors"),
    )


def test_a_signal_during_the_final_grid_finishes_it_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    real = trainer_module.generate

    def generate(*a, **k):
        raise_sigterm()
        return real(*a, **k)

    monkeypatch.setattr(trainer_module, "generate", generate)
    run = tmp_path / "run"
    result = _train(run, "trainer.steps=2", "trainer.sample_n=4", "trainer.sample_steps=2")
    assert result["step"] == 2 and "stopped" not in result and (run / "grid.png").is_file()
    assert "step 2: loss" in capsys.readouterr().out


def test_a_signal_during_the_final_checkpoint_leaves_the_grid_to_the_resume(tmp_path, monkeypatch, capsys):
    real = trainer_module.Trainer.save

    def save(self):
        if self.step == 2:
            raise_sigterm()
        return real(self)

    monkeypatch.setattr(trainer_module.Trainer, "save", save)
    run = tmp_path / "run"
    result = _train(run, "trainer.steps=2", "trainer.sample_n=4", "trainer.sample_steps=2")
    assert result["stopped"] and result["step"] == 2 and not (run / "grid.png").exists()
    assert "training is complete; the final grid was not drawn" in capsys.readouterr().out
    monkeypatch.undo()
    _train(run, "trainer.steps=2", "trainer.sample_n=4", "trainer.sample_steps=2", "resume=true")
    assert (run / "grid.png").is_file() and [r[0] for r in records(run)] == [2]


def test_stop_request_second_sigint_aborts_and_immediate_phases_raise():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    with StopRequest() as stop:
        with pytest.raises(Stopped):
            with stop.immediately():
                signal.raise_signal(signal.SIGTERM)
                time.sleep(5)  # never reached
        with pytest.raises(Stopped):  # a request made before the phase stops it at its start
            with stop.immediately():
                pass
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), StopRequest)  # handlers restored


def test_a_signal_before_the_job_is_held_for_it_and_a_stop_carries_to_the_next_sweep_job(tmp_path, monkeypatch, capsys):
    """The CLI takes signals before torch and Hydra load (signals.handle_early): one that comes then stops the job
    at its first safe point; and after a job stopped, the next job of a -m sweep in the process stops at once."""
    import diffuse.signals as signals_module

    early = StopRequest().__enter__()
    monkeypatch.setattr(signals_module, "_early", early)
    try:
        raise_sigterm()  # e.g. while Hydra composes the config
        assert early.requested
        assert sample.run(compose("sample", [*ORACLE, "n=4"]), tmp_path / "a")["written"] == 0
        early.requested = False
        with StopRequest():  # a job a signal stopped ...
            raise_sigterm()
        assert early.requested  # ... leaves the request to the next job
        assert _train(tmp_path / "b", "trainer.steps=3")["step"] == 0
    finally:
        early.__exit__(None, None, None)
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), StopRequest)


# -- sample -----------------------------------------------------------------------------------------------------

ORACLE = ["model=oracle", "dataset=gmm", "steps=4", "seed=5"]


def test_sample_stops_between_batches_and_resume_gives_the_straight_files(tmp_path, monkeypatch, capsys):
    args = [*ORACLE, "n=20", "batch_size=4", "save_npz=true"]
    straight = sample.run(compose("sample", args), tmp_path / "straight")
    run = tmp_path / "run"
    stop_at_batch(monkeypatch, sample, 2)
    capsys.readouterr()
    result = sample.run(compose("sample", args), run)
    out = capsys.readouterr().out
    assert result == {"n": 20, "written": 8, "stopped": True}
    assert sorted(p.name for p in (run / "images").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    assert not (run / "grid.png").exists() and not (run / "samples.npz").exists() and not (run / "sample.json").exists()
    assert f"stopped by signal (SIGTERM): 8 of 20 images written to {run / 'images'}" in out
    assert f"continue with: diffuse sample resume=true hydra.run.dir={run.resolve()}" in out
    monkeypatch.undo()
    resumed = sample.run(compose("sample", [*args, "resume=true", "batch_size=3"]), run)
    assert resumed == straight
    for name in ["grid.png", "samples.npz", *(f"images/{i:06d}.png" for i in range(20))]:
        assert (run / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_sample_stopped_before_its_first_batch_keeps_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from diffuse.pipeline import config

    real = config.model_of

    def model_of(*a):
        raise_sigterm()  # while the model loads
        return real(*a)

    monkeypatch.setattr(config, "model_of", model_of)
    assert sample.run(compose("sample", [*ORACLE, "n=4", "save_images=false"]), tmp_path / "o")["stopped"]
    assert "stopped by signal (SIGTERM): no image kept (save_images=false): run it again" in capsys.readouterr().out


# -- eval -------------------------------------------------------------------------------------------------------


@pytest.fixture
def fx(feature_ckpt, tmp_path):
    return [
        "metrics.features=checkpoint",
        f"metrics.features_ckpt={feature_ckpt}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "dataset.size=48",
        "metrics.kid_subset_size=8",
        "metrics.kid_subsets=4",
        "metrics.batch_size=3",
    ]


def test_eval_keeps_features_per_batch_and_resume_gives_the_straight_metrics(tmp_path, monkeypatch, capsys, fx):
    args = [*fx, *ORACLE, "metric=[fid,kid]", "n=40", "batch_size=8"]
    straight = evaluate.run(compose("eval", args), tmp_path / "straight")
    run = tmp_path / "run"
    stop_at_batch(monkeypatch, evaluation, 3)
    capsys.readouterr()
    assert evaluate.run(compose("eval", args), run) == {"stopped": True, "kept": 24}
    out = capsys.readouterr().out
    assert f"features of 24 of 40 generated images kept in {run / 'features'}" in out and "resume=true" in out
    assert sorted(p.name for p in (run / "features").iterdir()) == [
        "0000000.safetensors",
        "0000008.safetensors",
        "0000016.safetensors",
    ]
    assert not (run / "metrics.json").exists()
    monkeypatch.undo()
    # Another extractor, or other samples, cannot use what was kept.
    ck = load_checkpoint(fx[1].split("=", 1)[1])
    ck.model = ck.ema = {k: v + 1 for k, v in ck.model.items()}
    other = save_checkpoint(tmp_path / "other.safetensors", ck)
    with pytest.raises(UserError, match="holds features of features='checkpoint' .* keep the same metrics"):
        evaluate.run(compose("eval", [*args, "resume=true", f"metrics.features_ckpt={other}"]), run)
    with pytest.raises(UserError, match="has seed=5 and this run seed=6"):
        evaluate.run(compose("eval", [*args, "resume=true", "seed=6"]), run)
    capsys.readouterr()
    resumed = evaluate.run(compose("eval", [*args, "resume=true", "batch_size=5"]), run)
    assert "resume: features of 24 image(s) kept, 16 to draw" in capsys.readouterr().out
    assert resumed["metrics"] == pytest.approx(straight["metrics"], rel=1e-6)
    assert resumed["nfe"] == straight["nfe"] == 4
    assert json.loads((run / "metrics.json").read_text())["metrics"] == resumed["metrics"]
    assert not (run / "features").exists()  # done: the features are not kept beside metrics.json


def test_eval_resume_with_every_feature_kept_draws_nothing(tmp_path, monkeypatch, fx):
    """A stop in the reference statistics (an immediate phase, after sampling) keeps all the samples' features."""
    import diffuse.metrics.references as references

    args = [*fx, *ORACLE, "metric=[fid]", "n=12", "batch_size=6"]
    straight = evaluate.run(compose("eval", args), tmp_path / "straight")
    real = references.reference_features

    def reference_features(*a, **k):
        raise_sigterm()
        raise AssertionError("the signal was to stop the phase where it was")

    monkeypatch.setattr(references, "reference_features", reference_features)
    run = tmp_path / "run"
    assert evaluate.run(compose("eval", [*args, "metrics.cache=false"]), run) == {"stopped": True, "kept": 12}
    monkeypatch.setattr(references, "reference_features", real)
    generated = []
    monkeypatch.setattr(evaluation, "features_in_chunks", lambda *a: generated.append(1))
    resumed = evaluate.run(compose("eval", [*args, "resume=true"]), run)
    assert not generated and resumed["metrics"] == pytest.approx(straight["metrics"], rel=1e-6) and resumed["nfe"] == 4


def test_eval_likelihood_is_stopped_where_it_is(tmp_path, monkeypatch, capsys):
    def score(*a, **k):
        raise_sigterm()
        time.sleep(30)  # a long estimate that never looks at the request
        raise AssertionError("not stopped")

    monkeypatch.setattr(scoring, "score", score)
    t0 = time.time()
    args = [
        "model=oracle",
        "dataset=gmm",
        "dataset.resolution=4",
        "dataset.channels=1",
        "metric=[nll]",
        "likelihood.n=8",
    ]
    assert evaluate.run(compose("eval", args), tmp_path / "o") == {"stopped": True}
    assert time.time() - t0 < 20
    assert "stopped by signal (SIGTERM): nothing of this evaluation is kept: run it again" in capsys.readouterr().out


# -- inpaint ----------------------------------------------------------------------------------------------------


def test_inpaint_finishes_the_current_image_and_lists_the_rest(tmp_path, monkeypatch, capsys):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()).save(d / f"{name}.png")
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask.numpy()).save(tmp_path / "mask.png")
    real = inpaint.complete

    def complete(*a, **k):
        raise_sigterm()
        return real(*a, **k)

    monkeypatch.setattr(inpaint, "complete", complete)
    cfg = compose(
        "inpaint",
        [
            f"image={d}",
            f"mask={tmp_path / 'mask.png'}",
            "model=oracle",
            "dataset=gmm",
            "steps=4",
            "inpaint=replace",
            "n=2",
        ],
    )
    out = tmp_path / "out"
    info = inpaint.run(cfg, out)
    assert (
        info["stopped"]
        and info["images"] == [str(d / "a.png")]
        and info["not_done"] == [str(d / "b.png"), str(d / "c.png")]
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["a_00.png", "a_01.png", "a_strip.png"]
    assert json.loads((out / "inpaint.json").read_text())["not_done"] == info["not_done"]
    assert "stopped by signal (SIGTERM): 1 of 3 image(s) inpainted" in capsys.readouterr().out


# -- real processes ---------------------------------------------------------------------------------------------


def _sigterm_when(cmd, cwd, ready, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffuse", *cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before the signal: {proc.communicate()}"
        assert time.time() < deadline, "never got ready"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def test_sigterm_to_diffuse_sample_exits_0_and_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["model=oracle", "dataset=gmm", "sampler=ddpm", "steps=400", "n=400", "batch_size=2", "seed=1"]
    rc, stdout, stderr = _sigterm_when(
        ["sample", *args, f"hydra.run.dir={run}"],
        tmp_path,
        lambda: len(list((run / "images").glob("*.png"))) >= 2 if (run / "images").is_dir() else False,
    )
    assert rc == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[-2].startswith("stopped by signal (SIGTERM): ") and f"resume=true hydra.run.dir={run}" in lines[-2]
    assert lines[-1] == f"run dir: {run.resolve()}" and "Traceback" not in stderr
    kept = sorted(p.name for p in (run / "images").iterdir())
    assert 2 <= len(kept) < 400 and kept == [f"{i:06d}.png" for i in range(len(kept))]
    assert not (run / "sample.json").exists()
    n = len(kept) + 2  # a short resume: the kept images plus two
    sample.run(compose("sample", [*args, f"n={n}", "resume=true"]), run)
    sample.run(compose("sample", [*args, f"n={n}"]), tmp_path / "straight")
    for i in range(n):
        assert (run / "images" / f"{i:06d}.png").read_bytes() == (
            tmp_path / "straight" / "images" / f"{i:06d}.png"
        ).read_bytes()


def test_sigterm_to_diffuse_eval_exits_0_and_resumes(tmp_path, fx):
    run = tmp_path / "run"
    args = [
        *fx,
        "model=oracle",
        "dataset=gmm",
        "sampler=ddpm",
        "steps=300",
        "n=300",
        "batch_size=4",
        "seed=2",
        "metric=[fid]",
    ]
    feats = run / "features"
    rc, stdout, stderr = _sigterm_when(
        ["eval", *args, f"hydra.run.dir={run}"],
        tmp_path,
        lambda: feats.is_dir() and len(list(feats.glob("0*.safetensors"))) >= 1,
    )
    assert rc == 0, stderr
    lines = stdout.strip().splitlines()
    assert (
        lines[-2].startswith("stopped by signal (SIGTERM): features of ")
        and "continue with: diffuse eval resume=true" in lines[-2]
    )
    assert not (run / "metrics.json").exists() and "Traceback" not in stderr
    kept = FeatureStore(feats).count()
    assert 4 <= kept < 300 and kept % 4 == 0
    # A short resume: the kept features and one more batch.
    short = [a for a in args if not a.startswith("n=")] + [f"n={kept + 4}"]
    resumed = evaluate.run(compose("eval", [*short, "resume=true"]), run)
    straight = evaluate.run(compose("eval", short), tmp_path / "straight")
    assert resumed["metrics"] == pytest.approx(straight["metrics"], rel=1e-6)


def test_tune_schedule_stops_where_it_is_and_resumes_its_search(tmp_path, monkeypatch):
    """A signal during the search ends it at once with exit 0 and one line; tune_state.json holds the last finished
    sweep, and resume=true ends where an uninterrupted search ends."""
    import signal as _signal

    from diffuse.pipeline import tuning
    from diffuse.tasks import tune_schedule as tune_task
    from tests.conftest import compose

    args = ["model=oracle", "steps=5", "n=64", "n_eval=64", "tune.reference_steps=100", "tune.iterations=6"]
    straight = tune_task.run(compose("tune_schedule", args), tmp_path / "a")
    real = tuning.pattern_search

    def interrupted(loss, state, **kw):
        def on_iteration(s):
            kw_on(s)
            if s.iteration == 2:
                _signal.raise_signal(_signal.SIGTERM)

        kw_on = kw.pop("on_iteration")
        return real(loss, state, on_iteration=on_iteration, **kw)

    monkeypatch.setattr(tuning, "pattern_search", interrupted)
    assert tune_task.run(compose("tune_schedule", args), tmp_path / "b") == {"stopped": True}
    monkeypatch.setattr(tuning, "pattern_search", real)
    saved = json.loads((tmp_path / "b" / "tune_state.json").read_text())["state"]
    assert saved["iteration"] == 2
    resumed = tune_task.run(compose("tune_schedule", [*args, "resume=true"]), tmp_path / "b")
    assert resumed["sigmas"] == straight["sigmas"]
