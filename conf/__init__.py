"""The Hydra config tree: conf/ in the repository, installed as the package diffuse.conf (see pyproject.toml)."""

# Hydra imports this package to read its configs: the run dirs' ${stamp:...} is there before any is resolved,
# in every process that composes them (a launched job's too).
from diffuse.rundir import register as _register

_register()


def group_defaults(group: str, option: str) -> dict:
    """The values conf/<group>/<option>.yaml declares, its defaults list (options of the same group) merged in
    first: the one source of defaults for code that fills in what a checkpoint or a converted file lacks, so that
    no reader repeats a YAML default as a Python literal."""
    from pathlib import Path

    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).parent / group / f"{option}.yaml")
    merged = OmegaConf.create()
    own = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"]) if "defaults" in node else node
    for entry in node.get("defaults", []):
        if entry != "_self_":
            merged = OmegaConf.merge(merged, group_defaults(group, str(entry)))
    merged = OmegaConf.merge(merged, own)
    return OmegaConf.to_container(merged)
