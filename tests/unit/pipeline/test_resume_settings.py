"""resume=true's comparison of an earlier run's config with this one (pipeline.resume), shared by sample and eval:
the first differing key in order, the default for keys older run dirs lack, and each command's own message."""

import pytest
from omegaconf import OmegaConf

from diffuse.errors import UserError
from diffuse.pipeline.resume import SAMPLING_KEYS, first_change
from diffuse.tasks import evaluate, sample
from tests.conftest import compose


def test_first_change_is_the_first_differing_key_then_the_extra_triples():
    old = {"seed": 0, "steps": 4, "sampler": "ddim"}
    assert first_change(old, dict(old), SAMPLING_KEYS) is None
    assert first_change(old, {**old, "steps": 8, "seed": 1}, SAMPLING_KEYS) == ("seed", 0, 1)
    assert first_change(old, {**old, "steps": 8}, ["steps"], ("runtime.precision", "fp32", "bf16")) == ("steps", 4, 8)
    assert first_change(old, dict(old), ["steps"], ("runtime.precision", "fp32", "bf16")) == (
        "runtime.precision",
        "fp32",
        "bf16",
    )
    assert first_change(old, dict(old), ["steps"], ("x", 1, 1)) is None


def test_keys_an_older_run_dir_lacks_default_to_this_runs_but_others_do_not():
    new = {"cascade": None, "condition": {"kind": "none"}, "guidance": 1.0}
    assert first_change({}, new, ["cascade", "condition"]) is None  # drawn before cascades existed: the defaults
    assert first_change({}, new, ["guidance"]) == ("guidance", None, 1.0)
    assert first_change({"cascade": "a"}, new, ["cascade"]) == ("cascade", "a", None)


def _write_old(out, name, overrides):
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(compose(name, overrides), out / "config.yaml")


def test_eval_compares_the_dataset_only_for_the_oracle_and_after_the_sampling_keys(tmp_path):
    base = ["model=oracle", "dataset=gmm", "steps=4"]
    _write_old(tmp_path, "eval", base)
    evaluate.check_resume(compose("eval", base), tmp_path)
    with pytest.raises(UserError, match="has dataset.*the features kept would not be this run's samples'"):
        evaluate.check_resume(compose("eval", [*base, "dataset.size=7"]), tmp_path)
    with pytest.raises(UserError, match=r"has steps=4 and this run steps=5: the features kept"):
        evaluate.check_resume(compose("eval", [*base, "dataset.size=7", "steps=5"]), tmp_path)
    ckpt = tmp_path / "ckpt"
    _write_old(ckpt, "eval", ["ckpt=x.safetensors", "dataset=gmm"])  # with a checkpoint dataset= is the reference
    evaluate.check_resume(compose("eval", ["ckpt=x.safetensors", "dataset=gmm", "dataset.size=7"]), ckpt)


def test_sample_compares_the_dataset_in_its_place_and_its_own_message(tmp_path):
    base = ["model=oracle", "dataset=gmm", "steps=4"]
    _write_old(tmp_path, "sample", base)
    sample.check_resume(compose("sample", base), tmp_path)
    with pytest.raises(UserError, match="has dataset.*the images written would not be this run's"):
        sample.check_resume(compose("sample", [*base, "dataset.size=7", "schedule.T=500"]), tmp_path)
    with pytest.raises(UserError, match=r"has runtime.precision=.*the images written"):
        sample.check_resume(compose("sample", [*base, "runtime.precision=bf16"]), tmp_path)
