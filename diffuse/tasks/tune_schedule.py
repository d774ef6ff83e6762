"""diffuse tune-schedule: a model + a deterministic solver + N -> the N noise levels that bring the solver's outputs
closest to a high-NFE reference from the same x_T -> schedule.json, levels.png and the checkpoint's metadata."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig
from rich.progress import TextColumn
from safetensors.torch import load_file, save_file

from diffuse.checkpoint import load_checkpoint, resolve_ckpt_path, save_checkpoint
from diffuse.console import console, progress_bar
from diffuse.diffusion.noise import PerSample, randn
from diffuse.diffusion.samplers.common import sigma_of, time_list
from diffuse.diffusion.timesteps import sigma_timesteps
from diffuse.errors import UserError
from diffuse.io import atomic_write, save_resolved_config, write_json
from diffuse.pipeline.conditioning import Guidance, sample_labels
from diffuse.pipeline.config import checking_runtime, model_of, runtime_of, to_dict
from diffuse.pipeline.sampling import plan_sampler
from diffuse.pipeline.tuning import LOSSES, SearchState, check_tunable, key, log_rms, mse, sigmas_of, tune_levels
from diffuse.plot import line_plot
from diffuse.rundir.lock import check_free
from diffuse.rundir.outputs import check_dir_target
from diffuse.signals import Stopped, StopRequest
from diffuse.validate import check_choice, check_number


class Setup(NamedTuple):
    steps: int
    n: int
    n_eval: int
    batch_size: int
    seed: int
    tune: dict
    rt: Any
    model: Any
    stock: Any  # the solver's plan with its stock levels
    reference: Any
    identity: dict  # what tune_state.json must match for resume=true
    state: SearchState | None


def prepare(cfg: DictConfig, out: Path, checking: bool = False) -> Setup:
    """Everything run() refuses before it writes anything. checking=True (overrides.check_overrides, for every job of a -m
    sweep before the first starts) loads the model on the CPU."""
    steps = check_number("steps", cfg.steps, minimum=2, integer=True)
    n, n_eval = (
        check_number("n", cfg.n, minimum=1, integer=True),
        check_number("n_eval", cfg.n_eval, minimum=1, integer=True),
    )
    batch_size = check_number("batch_size", cfg.batch_size, minimum=1, integer=True)
    seed = check_number("seed", cfg.seed, integer=True)
    t = to_dict(cfg.tune)
    check_number("tune.reference_steps", t["reference_steps"], minimum=steps, integer=True)
    check_number("tune.iterations", t["iterations"], minimum=0, integer=True)
    check_number("tune.delta", t["delta"], minimum=0, exclusive_min=True)
    check_number("tune.min_delta", t["min_delta"], minimum=0, exclusive_min=True)
    check_choice("tune.loss", t["loss"], tuple(LOSSES))
    rt = runtime_of(cfg, images=0)
    model = model_of(cfg, checking_runtime(rt) if checking else rt)
    if cfg.write_ckpt and model.source.get("ckpt_verified") == "none":
        # Rewriting it would give content nobody verified a valid hash.
        raise UserError(
            f"write_ckpt=true would record the schedule in {model.source['ckpt']}, which carries no hash (loaded "
            "with verify=false): pass write_ckpt=false, the schedule is written to schedule.json all the same"
        )
    sampler_cfg = to_dict(cfg.sampler)
    stock = plan_sampler(sampler_cfg, steps, model.schedule, model.clip_x0, model.tuned, model.learned_variance)
    check_tunable(stock.name, stock.options)
    reference = plan_sampler(
        t["reference"], t["reference_steps"], model.schedule, model.clip_x0, learned_variance=model.learned_variance
    )
    check_tunable(reference.name, reference.options)
    identity = {
        "sampler": sampler_cfg,
        "steps": steps,
        "n": n,
        "n_eval": n_eval,
        "seed": seed,
        "reference": t["reference"],
        "reference_steps": t["reference_steps"],
        "loss": t["loss"],
        **model.source,
    }
    state = previous_state(out, identity) if cfg.resume else None
    return Setup(steps, n, n_eval, batch_size, seed, t, rt, model, stock, reference, identity, state)


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    # The search has no batch to finish: a signal stops it where it is (tune_state.json is written atomically after
    # every sweep, so what a resume continues is intact).
    with StopRequest() as stop:
        try:
            with stop.immediately():
                return tune(cfg, out)
        except Stopped:
            kept = (
                "the search after its last finished sweep (tune_state.json)"
                if (out / "tune_state.json").is_file()
                else "nothing"
            )
            console.print(stop.line(f"{kept} is kept", "tune-schedule", out.resolve()), markup=False)
            return {"stopped": True}


def tune(cfg: DictConfig, out: Path) -> dict[str, Any]:
    setup = prepare(cfg, out)
    steps, n, n_eval, _, seed, t, _, model, stock, reference, _, _ = setup
    save_resolved_config(cfg, out)
    solve = batched_solver(setup, sample_labels(model, Guidance(), None, None, max(n, n_eval)))
    x_tune = randn((n, *model.shape), PerSample(seed, range(n)), "cpu")
    x_eval = randn((n_eval, *model.shape), PerSample(seed + 1, range(n_eval)), "cpu")
    ref_tune, ref_eval = references(out, cfg.resume, lambda x: solve(reference, reference.timesteps, x), x_tune, x_eval)

    def run_levels(sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return solve(stock, sigma_timesteps(model.schedule, sigmas), x)

    stock_sigmas = torch.tensor([sigma_of(model.schedule, s) for s in time_list(stock.timesteps)], dtype=torch.float64)
    state = search(setup, out, lambda sigmas: run_levels(sigmas, x_tune), ref_tune, stock_sigmas)
    tuned = sigmas_of(state.params, model.schedule)
    result = {
        "sampler": stock.name,
        "steps": steps,
        "sigmas": tuned.tolist(),
        "timesteps": sigma_timesteps(model.schedule, tuned).tolist(),
        "stock_sigmas": stock_sigmas.tolist(),
        "options": stock.options,
        "reference": {"sampler": reference.name, "steps": reference.steps},
        "loss": t["loss"],
        "tune": {
            "stock": errors(run_levels(stock_sigmas, x_tune), ref_tune),
            "tuned": errors(run_levels(tuned, x_tune), ref_tune),
        },
        "heldout": {
            "stock": errors(run_levels(stock_sigmas, x_eval), ref_eval),
            "tuned": errors(run_levels(tuned, x_eval), ref_eval),
        },
        "n": n,
        "n_eval": n_eval,
        "seed": seed,
        "iterations": state.iteration,
        "evals": state.evals,
        **model.source,
    }
    write_json(out / "schedule.json", result)
    publish(cfg, out, setup, result, stock_sigmas, tuned)
    return result


def batched_solver(setup: Setup, labels: torch.Tensor | None):
    """solve(plan, timesteps, x): plan's solver over `timesteps` from every x_T, batch by batch (x_T row i has
    label i), on the CPU."""
    model, rt, batch_size = setup.model, setup.rt, setup.batch_size

    def solve(plan, timesteps, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(rt.device)
            y = labels[s : s + batch_size].to(rt.device) if labels is not None else None
            parts.append(plan.fn(model.denoiser, xb, timesteps, model.schedule, y=y, **plan.options).float().cpu())
        return torch.cat(parts)

    return solve


def search(setup: Setup, out: Path, run_tune, ref_tune: torch.Tensor, stock_sigmas: torch.Tensor) -> SearchState:
    """The pattern search from the stock levels (or from setup.state, resumed) with its progress bar, the state
    written to tune_state.json after every sweep and at the end."""
    t, state, stock = setup.tune, setup.state, setup.stock
    with progress_bar(True, TextColumn("{task.fields[loss]} {task.fields[value]:.4g}")) as bar:
        task = bar.add_task(
            f"tuning {stock.name} at {setup.steps} steps",
            total=t["iterations"],
            completed=state.iteration if state else 0,
            loss=t["loss"],
            value=state.loss if state else float("nan"),
        )

        def checkpoint_state(s: SearchState) -> None:
            write_json(out / "tune_state.json", {"identity": setup.identity, "state": s.to_json()})
            bar.update(task, completed=s.iteration, value=s.loss)

        state = tune_levels(
            run_tune,
            ref_tune,
            setup.model.schedule,
            stock_sigmas,
            loss=t["loss"],
            delta=t["delta"],
            min_delta=t["min_delta"],
            iterations=t["iterations"],
            state=state,
            on_iteration=checkpoint_state,
        )
    checkpoint_state(state)
    return state


def publish(cfg: DictConfig, out: Path, setup: Setup, result: dict, stock_sigmas, tuned: torch.Tensor) -> None:
    """levels.png, the schedule recorded in the checkpoint (write_ckpt=true) and the lines that say how to use it."""
    stock, steps, reference, model = setup.stock, setup.steps, setup.reference, setup.model
    line_plot(
        {"stock": list(enumerate(stock_sigmas.log10().tolist())), "tuned": list(enumerate(tuned.log10().tolist()))},
        out / "levels.png",
        title=f"{stock.name}, {steps} steps: noise levels",
        xlabel="step",
        ylabel="log10 sigma",
    )
    if "ckpt" in model.source and cfg.write_ckpt:
        record_in_checkpoint(Path(model.source["ckpt"]), result)
    h = result["heldout"]
    console.print(
        f"{stock.name} at {steps} steps against {reference.name} at {reference.steps} steps, {setup.n_eval} held-out "
        f"x_T: geometric-mean error stock {h['stock']['geomean']:.4g}, tuned {h['tuned']['geomean']:.4g}; "
        f"RMS stock {h['stock']['rms']:.4g}, tuned {h['tuned']['rms']:.4g} ({result['evals']} evaluations of the "
        "schedule)"
    )
    console.print(
        f"use it: sampler={stock.name} steps={steps} sampler.schedule="
        + ("tuned" if "ckpt" in model.source and cfg.write_ckpt else str(out / "schedule.json"))
    )


def errors(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """The per-x_T RMS errors summarised: their geometric mean (what tune.loss=logrms lowers) and the overall RMS."""
    return {"geomean": math.exp(log_rms(x, ref)), "rms": mse(x, ref) ** 0.5}


def previous_state(out: Path, identity: dict) -> SearchState | None:
    """The search to continue: resume=true needs a tune_state.json of the same model, solver, steps and x_T."""
    path = out / "tune_state.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise UserError(f"resume=true but {path} is not a search tune-schedule wrote: use another hydra.run.dir")
    if saved.get("identity") != json.loads(json.dumps(identity)):
        raise UserError(
            f"resume=true but {path} was made for another model, solver, steps, seed or reference: "
            "use another hydra.run.dir"
        )
    return SearchState.from_json(saved["state"], where=str(path))


def references(
    out: Path, resume: bool, solve, x_tune: torch.Tensor, x_eval: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference solver's outputs from the tune and held-out x_T, computed once per run dir (the expensive part)."""
    path = out / "reference.safetensors"
    if resume and path.is_file():
        saved = load_file(str(path))
        if saved["tune"].shape == x_tune.shape and saved["eval"].shape == x_eval.shape:
            return saved["tune"], saved["eval"]
    console.print(f"reference outputs for {x_tune.shape[0]} + {x_eval.shape[0]} x_T")
    ref = {"tune": solve(x_tune).contiguous(), "eval": solve(x_eval).contiguous()}
    atomic_write(path, lambda tmp: save_file(ref, str(tmp)))
    return ref["tune"], ref["eval"]


def record_in_checkpoint(path: Path, result: dict) -> None:
    """The checkpoint rewritten (atomically) with the schedule in its metadata, under "sampler/steps"."""
    ckpt = load_checkpoint(path, report=lambda line: None)  # a format-1 file was named when the model was loaded
    ckpt.tuned = {
        **ckpt.tuned,
        key(result["sampler"], result["steps"]): {
            k: result[k] for k in ("sampler", "steps", "sigmas", "options", "loss", "heldout")
        },
    }
    save_checkpoint(path, ckpt)
    console.print(f"recorded in {path} as {key(result['sampler'], result['steps'])}")


def check(cfg: DictConfig, out: Path) -> None:
    prepare(cfg, out, checking=True)


# What the command writes into its run dir (rundir.outputs: checked before the work starts).
OUTPUTS = ("config.yaml", "schedule.json", "levels.png", "tune_state.json", "reference.safetensors")


def check_targets(cfg: DictConfig, out: Path) -> None:
    """With write_ckpt=true the schedule is written into the checkpoint at the end: its folder must take the write,
    and the run that owns it must not be writing it meanwhile (its next save would drop the schedule)."""
    if not cfg.write_ckpt or cfg.ckpt in (None, ""):
        return
    ckpt = resolve_ckpt_path(cfg.ckpt).resolve()
    check_dir_target(
        ckpt.parent, f"ckpt={cfg.ckpt}: its folder {ckpt.parent} (write_ckpt=true writes the schedule into it)"
    )
    owner = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    if owner != out.resolve():
        try:
            check_free(owner)
        except UserError as e:
            raise UserError(f"ckpt={cfg.ckpt}: {e} (write_ckpt=false leaves the checkpoint alone)") from None
