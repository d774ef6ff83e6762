"""Precision/recall and density/coverage against closed forms and a brute-force count, and diffuse eval's
--metric pr/dc/fd with metrics.seeds (EDM's protocol: min and mean over sample sets drawn with seed + k)."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from diffuse.errors import UserError
from diffuse.metrics import manifold
from diffuse.metrics.manifold import density_coverage, precision_recall
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def test_identical_sets_are_on_each_other_and_far_sets_are_not():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    assert density_coverage(x, x.clone(), k=5)[1] == 1.0
    far = x + 1000.0
    assert precision_recall(x, far, k=3) == (0.0, 0.0)
    assert density_coverage(x, far, k=5) == (0.0, 0.0)


def test_a_hand_computed_configuration():
    # Reference 0, 1, 2, 3 (each one's nearest other point is 1 away); samples 0.5 and 10 (9.5 apart).
    real, fake = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[0.5], [10.0]])
    # 0.5 lies in the balls of 0 and 1, 10 in none: precision 1/2; the samples' balls (radius 9.5 around 0.5)
    # hold every reference point: recall 1.
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # density: 2 balls hold a sample, over k M = 2; coverage: 0 and 1 have a sample within 1, 2 and 3 do not.
    assert density_coverage(real, fake, k=1) == (1.0, 0.5)
    # k = 2: two samples have no second neighbour among themselves: refused.
    with pytest.raises(UserError, match="k=2 nearest neighbours need more than 2 points"):
        precision_recall(real, fake, k=2)


def _brute(real, fake, k):
    def radii(s):
        return [sorted(float((a - b).norm()) for j, b in enumerate(s) if j != i)[k - 1] for i, a in enumerate(s)]

    rr, rf = radii(real), radii(fake)
    d = [[float((f - r).norm()) for r in real] for f in fake]
    p = sum(any(d[j][i] <= rr[i] for i in range(len(real))) for j in range(len(fake))) / len(fake)
    r = sum(any(d[j][i] <= rf[j] for j in range(len(fake))) for i in range(len(real))) / len(real)
    dens = sum(d[j][i] < rr[i] for i, j in itertools.product(range(len(real)), range(len(fake)))) / (k * len(fake))
    cov = sum(min(d[j][i] for j in range(len(fake))) < rr[i] for i in range(len(real))) / len(real)
    return p, r, dens, cov


def test_blocked_computation_matches_a_brute_force_count(monkeypatch):
    monkeypatch.setattr(manifold, "BLOCK", 7)  # several blocks, a ragged last one
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(23, 4, generator=g), torch.randn(19, 4, generator=g) * 1.3 + 0.4
    for k in (1, 3, 5):
        p, r, dens, cov = _brute(real, fake, k)
        assert precision_recall(real, fake, k=k) == pytest.approx((p, r), abs=1e-12)
        assert density_coverage(real, fake, k=k) == pytest.approx((dens, cov), abs=1e-12)


def run_eval(overrides, out):
    from diffuse.tasks import evaluate

    return evaluate.run(compose("eval", overrides), Path(out))


def test_seeds_score_each_set_as_its_own_run_and_report_min_and_mean(fx, tmp_path):  # noqa: F811
    base = [
        *fx,
        "metric=[fid,pr,dc,fd]",
        "model=oracle",
        "n=16",
        "steps=2",
        "batch_size=16",
        "metrics.pr_k=2",
        "metrics.dc_k=3",
    ]
    many = run_eval([*base, "metrics.seeds=2", "seed=4"], tmp_path / "many")
    singles = [run_eval([*base, f"seed={s}"], tmp_path / f"one{s}")["metrics"] for s in (4, 5)]
    saved = json.loads((tmp_path / "many" / "metrics.json").read_text())
    assert saved["seeds"] == [4, 5] and [s["seed"] for s in saved["sets"]] == [4, 5]
    for key in ("fid", "precision", "recall", "density", "coverage", "fd_checkpoint"):
        vals = [m[key] for m in singles]
        assert [s["metrics"][key] for s in saved["sets"]] == pytest.approx(vals, rel=1e-6)
        assert many["metrics"][f"{key}_min"] == pytest.approx(min(vals), rel=1e-6)
        assert many["metrics"][f"{key}_mean"] == pytest.approx(sum(vals) / 2, rel=1e-6)
    assert singles[0]["fd_checkpoint"] == singles[0]["fid"]
    assert len({m["fid"] for m in singles}) == 2  # two different sample sets
    assert 0 <= many["metrics"]["precision_min"] <= 1 and saved["manifold_n"] == 16
    assert not (tmp_path / "many" / "features").exists()  # kept only while the run goes on


def test_seeds_need_a_model_to_draw_from(fx, tmp_path):  # noqa: F811
    import numpy as np

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((10, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="metrics.seeds=3 scores 3 sample sets drawn from a model"):
        run_eval([*fx, "metric=[pr]", f"samples={tmp_path / 's.npz'}", "metrics.seeds=3"], tmp_path / "x")
    with pytest.raises(UserError, match="metrics.pr_k=0 is not allowed"):
        run_eval([*fx, "metric=[pr]", "model=oracle", "n=10", "metrics.pr_k=0"], tmp_path / "y")


def test_seeds_resume_keeps_every_sets_features(fx, tmp_path, monkeypatch, capsys):  # noqa: F811
    from diffuse.scoring import evaluation
    from tests.helpers import stop_at_batch

    args = [
        *fx,
        "metric=[fid,pr]",
        "model=oracle",
        "n=8",
        "steps=2",
        "batch_size=4",
        "metrics.pr_k=2",
        "metrics.seeds=2",
    ]
    straight = run_eval(args, tmp_path / "straight")
    run = tmp_path / "run"
    stop_at_batch(monkeypatch, evaluation, 3)  # the first batch of the second set
    assert run_eval(args, run) == {"stopped": True, "kept": 12}
    assert "features of 12 of 16 generated images kept" in capsys.readouterr().out
    assert len(list((run / "features" / "set1").glob("*.safetensors"))) == 1
    monkeypatch.undo()
    resumed = run_eval([*args, "resume=true"], run)
    assert resumed["metrics"] == pytest.approx(straight["metrics"], rel=1e-6)
