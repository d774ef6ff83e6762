"""${stamp:FORMAT}: the time in the default run and sweep dirs (conf/hydra/default.yaml), one value for a whole job.

Hydra's ${now:...} is each process's own clock: under torchrun, ranks that start in different seconds would each
resolve their own outputs/train/<time> and write apart. ${stamp:...} is the first rank's time, agreed through
the torchrun agent's key-value store (the one torch.distributed's env:// rendezvous and diffuse.rundir.lock use),
every node included. The key is the run's (TORCHELASTIC_RUN_ID) and not the attempt's, so that a job torchrun
restarts after losing a node (--max-restarts) comes back to the same run dir, where resume=auto continues it.

DIFFUSE_RUN_STAMP, when set, is the value (a launcher that starts ranks without torchrun can export one to them
all). Several ranks without either refuse with one line: there is nothing they could agree through.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

ENV = "DIFFUSE_RUN_STAMP"


def stamp(pattern: str) -> str:
    # Not kept between calls: a rank's second resolution (the check before Hydra starts, then Hydra's) reads the
    # store's value again, and one process running several commands (tests) gets a new time for each, as with now.
    return agree(pattern, os.environ, run_store, time.time)


def agree(pattern: str, env: Mapping[str, str], store: Callable[[], object | None], clock: Callable[[], float]) -> str:
    """This job's time as `pattern` (strftime): DIFFUSE_RUN_STAMP, else alone this process's clock, else the
    value the first rank to get here put in the job's store (compare_set: it is set once, whoever comes first)."""
    fixed = env.get(ENV)
    if fixed:
        return fixed
    mine = time.strftime(pattern, time.localtime(clock()))
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return mine
    shared = store()
    if shared is None:
        raise ValueError(
            f"WORLD_SIZE={world} without torchrun's store: the ranks cannot agree on a timestamped run dir; "
            f"give hydra.run.dir=PATH (on storage every node sees) or set {ENV} for every rank"
        )
    return shared.compare_set(f"stamp/{pattern}", "", mine).decode()


def run_store():
    """The torchrun agent's store under this run's prefix (not the attempt's), or None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    from datetime import timedelta

    from torch.distributed import PrefixStore, TCPStore

    try:
        tcp = TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(minutes=5)
        )
    except (KeyError, ValueError, RuntimeError):
        return None
    return PrefixStore(f"diffuse/{os.environ.get('TORCHELASTIC_RUN_ID', '')}", tcp)


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("stamp"):
        # use_cache: Hydra copies a config's resolved values to the configs it makes from it (a submitit job's on
        # its node), so a launched job sees the submitting process's value.
        OmegaConf.register_new_resolver("stamp", stamp, use_cache=True)
