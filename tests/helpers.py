"""What several test modules share: the repository root, `diffuse` run as a user runs it, a signal raised where a
test means it to land, and a checkpoint rewritten with other metadata."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from diffuse.checkpoint import checkpoint_hash, content_hash
from diffuse.signals import StopRequest

ROOT = Path(__file__).resolve().parents[1]


def diffuse(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffuse", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def raise_sigterm():
    """SIGTERM to this process, as a cluster sends it; refused unless a StopRequest holds it (the default action
    would end the test run)."""
    handler = signal.getsignal(signal.SIGTERM)
    assert getattr(handler, "__self__", None).__class__ is StopRequest, f"SIGTERM is not handled here: {handler}"
    signal.raise_signal(signal.SIGTERM)


def stop_at_batch(monkeypatch, module, k: int):
    """SIGTERM while the k-th batch (from 1) is handled: the features or PNGs of that batch are still written."""
    calls = []
    real = module.to_uint8

    def to_uint8(x):
        calls.append(1)
        if len(calls) == k:
            raise_sigterm()
        return real(x)

    monkeypatch.setattr(module, "to_uint8", to_uint8)


def rewrite(src, dst, *, config=None, meta=None, drop=None, old_format=False):
    """A copy of checkpoint `src` with its config changed by `config(cfg)` and its other metadata by `meta(m)`,
    hashed again as diffuse would hash it (so only the checks of its content can refuse it), or as format 1 did,
    or with a key dropped after hashing."""
    with safe_open(str(src), "pt") as f:
        m, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if config:
        cfg = json.loads(m["diffuse.config"])
        config(cfg)
        m["diffuse.config"] = json.dumps(cfg)
    if meta:
        meta(m)
    m["diffuse.sha256"] = checkpoint_hash(tensors, m)
    if old_format:
        m["diffuse.format"], m["diffuse.sha256"] = "1", content_hash(tensors)
    if drop:
        m.pop(drop)
    save_file(tensors, str(dst), metadata=m)
    return dst
