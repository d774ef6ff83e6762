"""The Hydra config tree: conf/ in the repository, installed as the package diffuse.conf (see pyproject.toml)."""

# Hydra imports this package to read its configs: the run dirs' ${stamp:...} is there before any is resolved,
# in every process that composes them (a launched job's too).
from diffuse.rundir.stamp import register as _register

_register()
