"""logger=none|tensorboard|wandb: where a training run's numbers and sample grids go besides its run dir.

Whatever the logger, metrics.jsonl and curves.png are written (training.loop); a logger adds a service's view of
the same records: loss, lr, images/s and skipped steps at each log step, the in-training evaluation, and each
sample grid. Both services are optional extras (pip install 'diffuse[tensorboard]' / 'diffuse[wandb]'), checked
before the run starts. Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import torch

from diffuse.console import console
from diffuse.errors import UserError
from diffuse.validate import check_choice

LOGGERS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_MODES = ("auto", "online", "offline", "disabled")


def check_logger(cfg: dict | None) -> dict:
    """The logger group, and its package installed: refused before the first step, not at the first log line."""
    cfg = dict(cfg or {"name": "none"})
    name = cfg["name"]
    check_choice("logger", name, LOGGERS)
    if name in PACKAGES and not installed(PACKAGES[name]):
        raise UserError(
            f"logger={name} needs the {PACKAGES[name]} package, which is not installed: "
            f"pip install 'diffuse[{name}]' (or logger=none)"
        )
    if name == "wandb":
        check_choice("logger.mode", cfg["mode"], WANDB_MODES)
    return cfg


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class Tracker:
    """logger=none, and every rank but 0: nothing beyond the run dir."""

    name = "none"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        """grid: uint8, C x H x W."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under RUN/tensorboard (logger.dir): `tensorboard --logdir RUN` shows them. A resumed run appends
    a new event file beside the first; TensorBoard reads them as one run."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: dict, start: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # A run resumed from a checkpoint older than its last log step logs those steps again: purge_step tells
        # TensorBoard to hide the earlier file's events past the checkpoint, as resume cuts metrics.jsonl there.
        # What the checkpoint's own step logged (record, eval, grid) came before it was saved and is kept.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start + 1 if start else None)
        self.writer.add_text("config", _config_text(config), start)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # at the log cadence: what a live TensorBoard shows is at most one interval old

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        self.writer.add_image(tag, grid, step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in RUN/wandb. Its id is kept in RUN/wandb/run_id, so that resume=true continues the
    same W&B run. mode=auto logs online when a server and credentials are there, offline otherwise (one line says
    so; `wandb sync RUN/wandb/offline-run-*` uploads it later)."""

    name = "wandb"

    def __init__(self, cfg: dict, out: Path, config: dict):
        import wandb

        self.wandb = wandb
        wdir = out / "wandb"
        wdir.mkdir(parents=True, exist_ok=True)
        id_file = wdir / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg.get("project") or "diffuse",
            entity=cfg.get("entity"),
            name=cfg.get("run_name") or out.name,
            dir=str(out),
            config=config,
            id=run_id,
            resume="allow",
            mode=wandb_mode(cfg["mode"], wdir),
            tags=list(cfg.get("tags") or []),
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        hwc = grid.permute(1, 2, 0).cpu().numpy()
        self.run.log({tag: self.wandb.Image(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)}, step=step)  # grey: H x W

    def close(self) -> None:
        # Called on the way out of the run: a run ended by an exception (non-finite losses, a full disk, a crash)
        # shows as failed in W&B rather than finished. A stop by signal is a normal end: it checkpoints and resumes.
        self.run.finish(exit_code=0 if sys.exc_info()[1] is None else 1)


def wandb_mode(mode: str, wdir: Path) -> str | None:
    """auto: WANDB_MODE when set (wandb reads it itself: None), else online if the server (WANDB_BASE_URL) answers
    and there are credentials, offline if not; any other value as given."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return None
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    why = None
    if not reachable(host, port):
        why = f"no network ({host}:{port} does not answer)"
    elif not has_credentials(host):
        why = "no W&B credentials (WANDB_API_KEY or `wandb login`)"
    if why is None:
        return "online"
    console.print(
        f"wandb: {why}: logging offline into {wdir}; `wandb sync {wdir}/offline-run-*` uploads it later", markup=False
    )
    return "offline"


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def has_credentials(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_tracker(cfg: dict | None, out: Path, config: dict, main: bool, start: int = 0) -> Tracker:
    """start: the step the run (re)starts from, 0 for a fresh one."""
    cfg = check_logger(cfg)
    if not main or cfg["name"] == "none":
        return Tracker()
    if cfg["name"] == "tensorboard":
        return TensorBoardTracker(
            Path(str(cfg["dir"])).expanduser() if cfg.get("dir") else out / "tensorboard", config, start
        )
    return WandbTracker(cfg, out, config)


def _config_text(config: dict) -> str:
    import json

    # Four spaces: TensorBoard's text plugin renders markdown, and an indented block keeps the JSON as it is.
    return "\n".join("    " + line for line in json.dumps(config, indent=2, sort_keys=True, default=str).splitlines())
