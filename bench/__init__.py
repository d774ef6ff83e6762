"""Benchmarks that measure and print (results in docs/results/), run from the repository root as modules:
python -m bench.NAME. They use the package's pipeline and public commands, never a task module's insides."""
