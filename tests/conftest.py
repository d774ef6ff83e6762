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
