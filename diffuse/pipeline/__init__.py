"""What tasks and benchmarks share to turn a checkpoint (or the oracle) into samples; no run dirs, no Hydra."""
