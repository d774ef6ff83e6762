import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs alongside subprocesses (OMP_NUM_THREADS,
# when set, wins: with several test runs on one machine, one thread each is much faster).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

# CI runs the property tests on a fixed sequence of examples, so that a red build is reproducible; locally
# hypothesis keeps exploring new ones.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def compose(config_name: str, overrides: list[str] | None = None):
    """The real config of a command, as the CLI would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: an OpenMP team only adds overhead (far more on a busy machine); modules of small models
    use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture(scope="module")
def oracle_setup():
    """The default mixture, the linear schedule and the mixture's exact denoiser: ground truth for samplers."""
    from diffuse.data.gmm import default_mixture
    from diffuse.diffusion.oracle import GMMDenoiser
    from diffuse.diffusion.schedule import make_schedule

    mixture = default_mixture()
    schedule = make_schedule("linear")
    return mixture, schedule, GMMDenoiser(mixture, schedule)


def gaussian_x_T(n, shape, seed=0):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class GaussianFlow:
    """Data N(mu, s^2 I): its exact denoiser (a one-component mixture) and its probability-flow ODE in closed form.

    Under x_t = alpha x_0 + sigma eps the marginal at every level is N(alpha mu, (alpha^2 s^2 + sigma^2) I) and the
    flow keeps the standardised point z = (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so any level maps to
    any other exactly. A solver's last step to clean data is x0_hat at its last level; `reference` is what a
    solver that integrates the ODE exactly up to that level returns, so that its error is the integration error
    alone and shrinks with the step size at the solver's order."""

    def __init__(self, schedule, s: float = 0.5, shape=(1, 4, 4), seed: int = 0):
        from diffuse.data.gmm import GaussianMixture
        from diffuse.diffusion.oracle import GMMDenoiser

        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(shape, generator=g, dtype=torch.float64) * 1.2 - 0.6
        self.s, self.schedule = s, schedule
        mixture = GaussianMixture(
            self.mu[None], torch.tensor([s], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        )
        self.denoiser = GMMDenoiser(mixture, schedule)

    def _ab(self, t) -> float:
        from diffuse.diffusion.samplers.common import alpha_bar_of

        return alpha_bar_of(self.schedule, t)

    def flow(self, x: torch.Tensor, t_from, t_to) -> torch.Tensor:
        a0, a1 = self._ab(t_from) ** 0.5, self._ab(t_to) ** 0.5
        v0, v1 = a0**2 * self.s**2 + (1 - a0**2), a1**2 * self.s**2 + (1 - a1**2)
        return a1 * self.mu + (v1 / v0) ** 0.5 * (x - a0 * self.mu)

    def reference(self, x_T: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from diffuse.diffusion.samplers.common import batch_time, time_list

        ts = time_list(timesteps)
        x_last = self.flow(x_T, ts[0], ts[-1])
        a = self._ab(ts[-1]) ** 0.5
        eps = self.denoiser(x_last, batch_time(ts[-1], x_last))
        return (x_last - (1 - a**2) ** 0.5 * eps) / a

    def x_T(self, n: int = 8, seed: int = 1) -> torch.Tensor:
        return torch.randn((n, *self.mu.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def observed_orders(errors: list[float]) -> list[float]:
    """log2 of successive error ratios when the step count doubles: the observed order of convergence."""
    import math

    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


# -- trained and random-weight models shared by the whole session -----------------------------------------------
# Each is made once; a module that changes what it gets copies it first.

# The tiniest training run (diffuse train, one step) that still has every part of a checkpoint.
TINY_TRAIN = [
    "dataset.size=32",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=4",
    "trainer.sample_n=0",
    "trainer.steps=1",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The run dir of `diffuse train TINY_TRAIN`: read it, or copy it before writing into it."""
    from diffuse.tasks import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run(compose("train", TINY_TRAIN), out)
    finally:
        torch.set_num_threads(before)
    return out


# The tiny random-weight U-Net of the tests that need a network but no training; also eval's feature network
# (metrics.features=checkpoint): FID's machinery without Inception.
TINY_UNET = {
    "arch": "unet",
    "resolution": 8,
    "in_channels": 3,
    "ch": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "groups": 8,
}


@pytest.fixture(scope="session")
def feature_ckpt(tmp_path_factory):
    from diffuse.checkpoint import Checkpoint, save_checkpoint
    from diffuse.nets import build_network

    torch.manual_seed(0)
    net = build_network(TINY_UNET)
    path = tmp_path_factory.mktemp("fx") / "features.safetensors"
    config = {"model": TINY_UNET, "schedule": {"kind": "linear", "T": 1000}, "objective": {"prediction": "eps"}}
    save_checkpoint(path, Checkpoint(config=config, model=net.state_dict(), ema=net.state_dict()))
    return path


@pytest.fixture
def fx(feature_ckpt, tmp_path):
    """eval's overrides for the feature_ckpt network on a small gmm reference."""
    return [
        "metrics.features=checkpoint",
        f"metrics.features_ckpt={feature_ckpt}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "dataset=gmm",
        "dataset.size=48",
        "metrics.kid_subset_size=8",
        "metrics.kid_subsets=4",
    ]
