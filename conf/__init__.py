"""The Hydra config tree: conf/ in the repository, installed as the package diffuse.conf (see pyproject.toml)."""
