"""diffuse eval: generated and existing samples (npz, PNG folders), references and their cache, refusals, sweeps.

The Inception is not the point here: a tiny U-Net checkpoint is the feature extractor (metrics.features=checkpoint),
which keeps each evaluation well under a second."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.checkpoint import Checkpoint, save_checkpoint
from diffuse.errors import UserError
from diffuse.nets import build_network
from diffuse.pipeline.config import runtime_of
from diffuse.tasks import evaluate, sample
from tests.conftest import TINY_UNET, compose
from tests.helpers import diffuse

NET = TINY_UNET


def run_eval(overrides, out):
    return evaluate.run(compose("eval", overrides), Path(out))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """`diffuse sample model=oracle dataset=gmm save_npz=true`: samples.npz, images/ and sample.json."""
    out = tmp_path_factory.mktemp("sample")
    sample.run(
        compose(
            "sample", ["model=oracle", "dataset=gmm", "n=40", "steps=4", "batch_size=16", "save_npz=true", "seed=3"]
        ),
        out,
    )
    return out


def test_generated_and_saved_samples_score_identically(sampled, fx, tmp_path):
    gen = run_eval(
        [*fx, "metric=[fid,kid]", "model=oracle", "n=40", "steps=4", "batch_size=7", "seed=3"], tmp_path / "gen"
    )
    npz = run_eval([*fx, "metric=[fid,kid]", f"samples={sampled / 'samples.npz'}"], tmp_path / "npz")
    png = run_eval([*fx, "metric=[fid,kid]", f"samples={sampled / 'images'}"], tmp_path / "png")
    # Image i depends only on (seed, i) and PNG is lossless: the three are the same 40 images (generation
    # batches them differently, which moves the float32 features by rounding only).
    assert npz["metrics"] == png["metrics"]
    assert gen["metrics"] == pytest.approx(npz["metrics"], rel=1e-5)
    assert gen["metrics"]["fid"] > 0 and gen["metrics"]["kid_subset_size"] == 8
    saved = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert saved["n"] == 40 and saved["sampler"] == "ddim" and saved["nfe"] == 4 and saved["seed"] == 3
    assert saved["features"] == "checkpoint" and len(saved["weights_sha256"]) == 64
    assert saved["reference"] == {"source": "dataset gmm", "n": 48, "kid_features": 48}
    # Scored files carry what diffuse sample recorded beside them.
    assert npz["nfe"] == 4 and npz["sampler"] == "ddim" and npz["samples"].endswith("samples.npz")


def test_fid_ranks_the_oracle_above_noise_and_a_constant(sampled, fx, tmp_path):
    good = run_eval([*fx, f"samples={sampled}"], tmp_path / "a")["metrics"]["fid"]
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "noise.npz", arr_0=rng.randint(0, 256, (40, 8, 8, 3)).astype(np.uint8))
    np.savez(tmp_path / "flat.npz", arr_0=np.full((40, 8, 8, 3), 200, np.uint8))
    noise = run_eval([*fx, f"samples={tmp_path / 'noise.npz'}"], tmp_path / "b")["metrics"]["fid"]
    flat = run_eval([*fx, f"samples={tmp_path / 'flat.npz'}"], tmp_path / "c")["metrics"]["fid"]
    assert good < noise and good < flat


def test_reference_statistics_are_cached_saved_and_reused(sampled, fx, tmp_path):
    first = run_eval([*fx, f"samples={sampled}", f"save_ref={tmp_path / 'ref.safetensors'}"], tmp_path / "a")
    cached = list((tmp_path / "cache").glob("checkpoint-*.safetensors"))
    assert len(cached) == 1 and (tmp_path / "ref.safetensors").is_file()
    stamp = cached[0].stat().st_mtime_ns
    again = run_eval([*fx, f"samples={sampled}"], tmp_path / "b")
    assert cached[0].stat().st_mtime_ns == stamp and again["metrics"] == first["metrics"]  # read, not rewritten
    from_file = run_eval(
        [*fx, f"samples={sampled}", f"ref={tmp_path / 'ref.safetensors'}", "metrics.cache=false"], tmp_path / "c"
    )
    assert from_file["metrics"] == first["metrics"]
    # Another reference (a different dataset seed) is another cache entry.
    run_eval([*fx, f"samples={sampled}", "dataset.seed=1"], tmp_path / "d")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # Statistics made with other features are refused, not silently compared.
    other = [a for a in fx if not a.startswith("metrics.features_ckpt")]
    torch.manual_seed(1)
    net = build_network(NET)
    save_checkpoint(
        tmp_path / "other.safetensors",
        Checkpoint(config={"model": NET, "schedule": {"kind": "linear"}}, model=net.state_dict(), ema=net.state_dict()),
    )
    with pytest.raises(UserError, match="was computed with features=checkpoint .*recompute it"):
        run_eval(
            [
                *other,
                f"metrics.features_ckpt={tmp_path / 'other.safetensors'}",
                f"samples={sampled}",
                f"ref={tmp_path / 'ref.safetensors'}",
            ],
            tmp_path / "e",
        )


def test_save_ref_alone_and_a_png_folder_reference(fx, tmp_path):
    ref_dir = tmp_path / "refpng"
    ref_dir.mkdir()
    rng = np.random.RandomState(1)
    for i in range(10):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(ref_dir / f"{i:03d}.png")
    run_eval([*fx, f"ref={ref_dir}", f"save_ref={tmp_path / 's.safetensors'}"], tmp_path / "a")
    from diffuse.metrics.image_scores import load_stats

    stats = load_stats(tmp_path / "s.safetensors")
    assert stats.n == 10 and stats.meta["shape"] == [3, 8, 8] and stats.features.shape[0] == 10
    assert not (tmp_path / "a" / "metrics.json").exists()  # nothing was scored


def _npz(path, shape):
    np.savez(path, arr_0=np.zeros(shape, np.uint8))
    return path


@pytest.mark.parametrize(
    "shape,needle",
    [
        ((4, 16, 16, 3), "samples are 16x16 with 3 channels, the reference dataset gmm is 8x8 with 3 channels"),
        ((4, 8, 8, 1), "samples are 8x8 with 1 channel, the reference dataset gmm is 8x8 with 3 channels"),
    ],
)
def test_mismatched_resolution_or_channels_are_refused(fx, tmp_path, shape, needle):
    with pytest.raises(
        UserError, match=needle + ": samples and reference must have the same resolution and channel count"
    ):
        run_eval([*fx, f"samples={_npz(tmp_path / 's.npz', shape)}"], tmp_path / "out")


def test_a_named_dataset_reference_follows_the_samples_resolution(fx, tmp_path):
    """ref=shapes (16x16 by default) for 8x8 samples: the reference is drawn at 8x8, as a model trained with
    dataset=shapes dataset.resolution=8 makes them."""
    out = run_eval(
        [*fx, "metric=[fid]", "ref=shapes", f"samples={_npz(tmp_path / 's.npz', (6, 8, 8, 3))}"], tmp_path / "out"
    )
    assert out["reference"]["source"] == "dataset shapes" and out["metrics"]["fid"] > 0


def test_bad_sample_files_are_refused(fx, tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "k.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "c.npz", arr_0=np.zeros((4, 8, 8, 4), np.uint8))
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "empty").mkdir()
    for value, needle in [
        ("f.npz", "arr_0 is float32"),
        ("k.npz", "no arr_0"),
        ("c.npz", "C = 1 or 3"),
        ("mixed", "b.png is 9x8 with 3 channels but a.png is 8x8"),
        ("empty", "holds no .png"),
        ("nope.npz", "does not exist"),
    ]:
        with pytest.raises(UserError, match=needle):
            run_eval([*fx, f"samples={tmp_path / value}"], tmp_path / "out")
    with pytest.raises(UserError, match="n=5 is more than the 4 images"):
        run_eval([*fx, f"samples={_npz(tmp_path / 'ok.npz', (4, 8, 8, 3))}", "n=5"], tmp_path / "out")


def test_metric_names_and_sources_are_checked(fx, tmp_path):
    with pytest.raises(UserError, match="--metric fvd is not allowed: choose from fid, kid, is, fd, pr, dc, bpd, nll"):
        evaluate.metric_names(["fid", "fvd"])
    assert evaluate.metric_names(["kid", "fid", "kid"]) == ["kid", "fid"]
    with pytest.raises(UserError, match="nothing to evaluate"):
        run_eval(fx, tmp_path / "o")
    with pytest.raises(UserError, match="samples= and ckpt=/model= cannot both"):
        run_eval([*fx, "model=oracle", "samples=x.npz"], tmp_path / "o")
    with pytest.raises(UserError, match="--metric is needs metrics.features=inception"):
        run_eval([*fx, "metric=[is]", "model=oracle"], tmp_path / "o")
    with pytest.raises(UserError, match="ref='imagenet' is not allowed: give a dataset name"):
        run_eval([*fx, "model=oracle", "ref=imagenet"], tmp_path / "o")
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(gray / f"{i}.png")
    with pytest.raises(UserError, match="its network takes 3x8x8 images, these are 1x8x8"):
        run_eval([*fx, f"samples={_npz(tmp_path / 'g.npz', (4, 8, 8, 1))}", f"ref={gray}"], tmp_path / "o")


@pytest.mark.subprocess
def test_cli_refusal_is_one_line_exit_2_nothing_left(fx, tmp_path):
    _npz(tmp_path / "big.npz", (4, 16, 16, 3))
    r = diffuse("eval", "--metric", "fid", "samples=big.npz", *fx, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: the samples are 16x16")
        and "Traceback" not in r.stdout + r.stderr
    )
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*"))
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


@pytest.mark.subprocess
def test_sweep_writes_summary_and_plot(fx, tmp_path):
    r = diffuse(
        "eval",
        "-m",
        "--metric",
        "fid",
        "model=oracle",
        "n=6",
        "sampler=ddim,dpm_solver",
        "steps=2,4",
        *fx,
        f"hydra.sweep.dir={tmp_path / 'sw'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    sw = tmp_path / "sw"
    rows = (sw / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("job,sampler,steps,nfe,seed,n,features") and rows[0].endswith(",fid") and len(rows) == 5
    per_job = [json.loads((sw / str(j) / "metrics.json").read_text())["metrics"]["fid"] for j in range(4)]
    assert [float(row.split(",")[-1]) for row in rows[1:]] == pytest.approx(per_job, rel=1e-5)
    assert "| job | sampler |" in (sw / "summary.md").read_text() and "fid" in r.stdout
    img = np.asarray(Image.open(sw / "fid_vs_nfe.png").convert("RGB"))
    assert img.shape == (420, 640, 3)
    # One line per sampler, in the first two palette colours.
    for color in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(img.astype(int) - color).sum(-1) == 0).sum() > 50


@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_shards_samples_and_reference_like_one_process(fx, tmp_path):
    import os
    import subprocess
    import sys

    # n above the 32 feature dimensions, so that the covariance is not singular. Each rank holds every feature
    # after the gather: torchmetrics' own sync would count them twice (caught here: FID off by 1%).
    args = [
        "--metric",
        "fid",
        "--metric",
        "kid",
        "model=oracle",
        "n=41",
        "steps=3",
        "batch_size=8",
        "metrics.batch_size=5",
        "metrics.cache=false",
        *fx,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "diffuse",
            "eval",
            *args,
            f"hydra.run.dir={tmp_path / 'dist'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    single = run_eval([a for a in args[4:]] + ["metric=[fid,kid]"], tmp_path / "single")
    assert (
        dist["metrics"] == pytest.approx(single["metrics"], rel=1e-5)
        and dist["n"] == 41
        and dist["reference"]["n"] == 48
    )


LIK = ["model=oracle", "dataset=gmm", "dataset.resolution=4", "dataset.channels=1", "likelihood.ode_steps=32"]


@pytest.mark.slow
def test_nll_of_the_oracle_matches_the_mixture_and_the_bound_lies_above(tmp_path):
    """--metric nll on the exact denoiser: the ODE with exact traces is off the closed-form nll only by RK4 error
    (1.3e-3 nats/dim at 32 steps, bench/likelihood_table.py), and the variational bound is above it by far more
    than its standard error. Example i depends only on (seed, i): a different chunking gives the same figures."""
    a = run_eval(
        [*LIK, "metric=[nll]", "likelihood.n=96", "likelihood.hutchinson=0", "likelihood.batch_size=96"], tmp_path / "a"
    )
    m = a["metrics"]
    assert abs(m["nll_ode"] - m["nll_exact"]) < 4e-3, m
    assert m["nll_vlb"] - m["nll_exact"] > 4 * m["nll_vlb_sem"], m
    b = run_eval(
        [*LIK, "metric=[nll]", "likelihood.n=96", "likelihood.hutchinson=0", "likelihood.batch_size=40"], tmp_path / "b"
    )
    for key in ("nll_vlb", "nll_ode"):
        assert b["metrics"][key] == pytest.approx(m[key], abs=1e-9)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["likelihood"]["data"] == "dataset gmm (held-out draw, seed 1)" and saved["likelihood"]["n"] == 96
    assert "sampler" not in saved and "n" not in saved  # no samples are drawn for a likelihood


def test_bpd_is_on_the_8bit_grid_and_bounded_by_the_vlb(tmp_path):
    """The 8-bit figures: the ODE's dequantized bpd is near the exact discrete bpd of the quantized mixture data
    (a bound in expectation, so within its noise above it), and the bound is above both."""
    from diffuse.data import build_mixture
    from diffuse.images import from_uint8, to_uint8
    from diffuse.metrics.likelihood.units import LN2, grid_index
    from diffuse.metrics.mixture import mixture_interval_nll

    r = run_eval([*LIK, "metric=[bpd]", "likelihood.n=64", "likelihood.hutchinson=0"], tmp_path / "a")
    m = r["metrics"]
    cfg = compose("eval", LIK)
    ev = evaluate.Evaluation(cfg, runtime_of(cfg), evaluate.distributed.setup("cpu"), None)
    x = from_uint8(to_uint8(ev.likelihood_data[0][:64])).double()
    k = grid_index(x).double()  # the dequantization's bins: value k spread over [k, k + 1) / 128 - 1
    exact = float((mixture_interval_nll(build_mixture(cfg.dataset), k / 128 - 1, (k + 1) / 128 - 1) / LN2).mean())
    assert -5e-3 < m["bpd_ode"] - exact < 5e-3 + 4 * m["bpd_ode_sem"], (m, exact)
    assert m["bpd_vlb"] > m["bpd_ode"] and m["bpd_vlb"] > exact


def test_likelihood_refusals(feature_ckpt, tmp_path):
    with pytest.raises(UserError, match="needs dataset=NAME"):
        run_eval(["metric=[bpd]", f"ckpt={feature_ckpt}"], tmp_path / "o")
    with pytest.raises(UserError, match=r"likelihood.methods=\['exact'\] is not allowed"):
        run_eval([*LIK, "metric=[nll]", "likelihood.methods=[exact]"], tmp_path / "o")
    with pytest.raises(UserError, match="likelihood.n=100000 is more than the 10000 images"):
        run_eval([*LIK, "metric=[nll]", "likelihood.n=100000"], tmp_path / "o")
    with pytest.raises(UserError, match="likelihood.hutchinson=-1 is not allowed"):
        run_eval([*LIK, "metric=[nll]", "likelihood.hutchinson=-1"], tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_an_adm_npz_reference_is_the_same_images_as_a_png_folder(sampled, fx, tmp_path):
    """ref= takes an ADM-style npz (arr_0 uint8 N x H x W x C, how reference batches are shared): its statistics
    are those of the same images as PNG files, and the samples scored against themselves give FID ~ 0."""
    arr = np.load(sampled / "samples.npz")["arr_0"]
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    folder = tmp_path / "refpng"
    folder.mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    a = run_eval([*fx, "metric=[fid,kid]", f"samples={sampled}", f"ref={tmp_path / 'ref.npz'}"], tmp_path / "a")
    b = run_eval([*fx, "metric=[fid,kid]", f"samples={sampled}", f"ref={folder}"], tmp_path / "b")
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-9, abs=1e-9)
    assert a["reference"]["source"] == f"npz {tmp_path / 'ref.npz'}" and a["reference"]["n"] == 40
    assert abs(a["metrics"]["fid"]) < 1e-3
    (tmp_path / "notes.txt").write_text("x")
    for value, needle in [
        ("gone.npz", "ref='.*gone.npz' does not exist"),
        ("notes.txt", "is neither a statistics .safetensors, an ADM-style .npz"),
    ]:
        with pytest.raises(UserError, match=needle):
            run_eval([*fx, f"samples={sampled}", f"ref={tmp_path / value}"], tmp_path / "c")


def test_16_bit_and_grey_pngs_are_read_through_convert_image(tmp_path):
    """A 16-bit mid-grey PNG is 117 on the 8-bit scale (30000 / 65535 * 255), not clipped to 255, and it and other
    grey modes count as one channel."""
    from diffuse.images import open_images

    folder = tmp_path / "grey16"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(folder / "a.png")
    Image.fromarray(np.full((8, 8), 100, np.uint8)).convert("LA").save(folder / "b.png")
    src = open_images(folder, "samples")
    assert Image.open(folder / "a.png").mode.startswith("I") and src.shape == (1, 8, 8)
    batch = src.batch([0, 1])
    assert batch.dtype == torch.uint8 and batch[0].unique().tolist() == [117] and batch[1].unique().tolist() == [100]


def test_eval_sizes_its_runtime_by_the_images_it_draws(monkeypatch, tmp_path):
    """n=null generates the standard 50000, and that is what compile=auto weighs (it used to see null and never
    compile); runtime.compile=true is accepted by eval like by every command."""
    from diffuse.pipeline import runtime
    from diffuse.pipeline.config import to_dict

    class Seen(Exception):
        pass

    seen = []

    def record(cfg, images=None):
        seen.append(images)
        raise Seen

    monkeypatch.setattr(evaluate, "runtime_of", record)
    for extra in ([], ["n=64"]):
        with pytest.raises(Seen):
            run_eval(["model=oracle", *extra], tmp_path / "o")
    assert seen == [50000, 64]
    monkeypatch.setattr(runtime, "pick_device", lambda name: torch.device("cpu" if name == "cpu" else "cuda"))
    rc = to_dict(compose("eval", []).runtime)
    assert runtime.resolve_runtime(rc, images=50000).compile and runtime.resolve_runtime(rc, images=50000).cuda_graphs
    assert (
        not runtime.resolve_runtime(rc, images=64).compile and runtime.resolve_runtime(rc).compile
    )  # training: on CUDA
    forced = to_dict(compose("eval", ["runtime.compile=true"]).runtime)
    assert runtime.resolve_runtime(forced, images=64).compile
    assert not runtime.resolve_runtime({**rc, "device": "cpu"}, images=50000).compile
