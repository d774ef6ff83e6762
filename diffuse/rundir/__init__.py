"""The run dir as one wing: `stamp` (the one ${stamp:...} time of a job's default dir, on the ground floor: conf/
registers it), `lock` (RUN/.lock, one live process a dir), `outputs` (the paths a command writes, checked before any
work) and `guard` (a job run in the dir it owns; a refused command leaves the dir as it found it)."""
