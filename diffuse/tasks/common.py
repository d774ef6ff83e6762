"""Transitional: the names the tasks imported from here, now in their own modules (pipeline.config, io,
training.measure). Removed once every importer reads them there."""

from diffuse.io import save_resolved_config  # noqa: F401
from diffuse.pipeline.config import (  # noqa: F401
    checking_runtime,
    dataset_config,
    job_of,
    model_of,
    runtime_of,
    sampling_job_of,
    to_dict,
)
from diffuse.training.measure import train_then_measure  # noqa: F401
