import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs alongside subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def compose(config_name: str, overrides: list[str] | None = None):
    """The real config of a command, as the CLI would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="diffuse.conf", version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture
def compose_cfg():
    return compose
