"""Beyond one machine (issue 18, part 5): the default run dir is one for all the ranks of a torchrun job, whatever
second each started in; resume=auto for restarted jobs; and Hydra's submitit launcher composes with our configs.
No cluster is needed: the torchrun agent's store is a real TCPStore in this process, the ranks are simulated."""

import json
import time
from datetime import timedelta

import pytest
from omegaconf import OmegaConf

from diffuse.errors import UserError
from diffuse.rundir import stamp
from diffuse.tasks import train
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def agent_store():
    from torch.distributed import PrefixStore, TCPStore

    master = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    return lambda: PrefixStore("diffuse/run-1", master)


def compose_hydra(config_name: str, overrides: list[str]):
    """The config with its hydra node, as the CLI composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def run_dir_of(rank: int, started: float, store, monkeypatch) -> str:
    """hydra.run.dir as rank `rank` of a 2-process job resolves it, its clock reading `started`."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.delenv(stamp.ENV, raising=False)
    monkeypatch.setattr(stamp, "run_store", store)
    monkeypatch.setattr(time, "time", lambda: started)
    return str(compose_hydra("train", []).hydra.run.dir)


def test_ranks_started_in_different_seconds_resolve_one_run_dir(agent_store, monkeypatch):
    t0 = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    first = run_dir_of(1, t0, agent_store, monkeypatch)  # whichever rank comes first sets it
    second = run_dir_of(0, t0 + 3.0, agent_store, monkeypatch)
    assert first == second == "outputs/train/2026-03-04_05-06-07"
    # Another run (its own TORCHELASTIC_RUN_ID prefix) gets its own time.
    from torch.distributed import PrefixStore

    other = lambda: PrefixStore("diffuse/run-2", agent_store().underlying_store)  # noqa: E731
    assert run_dir_of(0, t0 + 60.0, other, monkeypatch) == "outputs/train/2026-03-04_05-07-07"


def test_one_process_keeps_its_clock_and_an_exported_stamp_wins(monkeypatch):
    t0 = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    env = {"WORLD_SIZE": "1"}
    assert (
        stamp.agree("%Y-%m-%d_%H-%M-%S", env, lambda: pytest.fail("no store alone"), lambda: t0)
        == "2026-03-04_05-06-07"
    )
    env = {"WORLD_SIZE": "8", "RANK": "3", stamp.ENV: "job-42"}
    assert stamp.agree("%H", env, lambda: None, lambda: t0) == "job-42"


def test_ranks_without_a_store_are_refused_in_one_line_naming_the_ways_out(monkeypatch):
    from diffuse.overrides import check_overrides

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv(stamp.ENV, raising=False)
    with pytest.raises(UserError) as e:
        check_overrides("train", [])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hydra.run.dir=") and "cannot agree" in msg and stamp.ENV in msg
    check_overrides("train", ["hydra.run.dir=/tmp/shared/run"])  # a dir given is nothing to agree on


def test_resume_auto_starts_a_new_run_and_continues_a_restarted_one(tmp_path):
    tiny = [
        "dataset=gmm",
        "dataset.size=32",
        "model.ch=16",
        "model.ch_mult=[1]",
        "model.attn_resolutions=[]",
        "trainer.batch_size=4",
        "trainer.log_every=1",
        "trainer.ckpt_every=2",
        "trainer.sample_n=0",
        "resume=auto",
    ]
    train.run(compose("train", [*tiny, "trainer.steps=2"]), tmp_path)
    out = train.run(compose("train", [*tiny, "trainer.steps=4"]), tmp_path)  # the same job, started again
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert out["step"] == 4 and steps == [1, 2, 3, 4]


def test_the_slurm_launcher_composes_with_the_train_config():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'diffuse[slurm]'")
    from diffuse.overrides import check_overrides

    overrides = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=1",
        "hydra.launcher.gpus_per_node=1",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.partition=gpu",
    ]
    cfg = compose_hydra("train", [*overrides, "hydra.sweep.dir=/shared/sweep"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["timeout_min"], launcher["partition"]) == (
        1,
        1,
        600,
        "gpu",
    )
    assert launcher["submitit_folder"] == "/shared/sweep/.submitit/%j"  # the job logs sit in the sweep dir
    # The checks diffuse runs before a sweep starts pass it: every job of the product is composed and checked.
    check_overrides("train", ["-m", *overrides, "trainer.seed=0,1", "trainer.steps=10"], train)
    check_overrides("eval", ["-m", *overrides, "model=oracle", "dataset=gmm", "steps=2,4", "n=8"])
