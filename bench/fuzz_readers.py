"""Fuzz the image and mask readers with many more inputs than the test suite does, and count the outcomes.
A benchmark: it prints figures; an input that ends in anything but a tensor or a UserError stops it with the
traceback (hypothesis prints the shrunk input).

    python -m bench.fuzz_readers [--n 5000] [--seed 0]

Inputs (tests/contracts/test_fuzz_readers.py image_files): a quarter random bytes; the rest PNG, JPEG, WebP, GIF, BMP and
TIFF images of 16 mode/format kinds (L, RGB, RGBA, P, I;16, LA, 1, CMYK, F ...), intact, cut short, with bytes
overwritten or spliced in. Readers: inpaint's _open (as RGB image, grey image, mask), load_pair, read_folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from diffuse.console import err_console
from tests.contracts.test_fuzz_readers import check_readers, image_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts: Counter = Counter()
    tried = 0
    warnings.simplefilter("ignore")  # PIL warns on many damaged files; the outcome is what counts here
    err_console.quiet = True  # and the mask reader on every grey one

    @seed(args.seed)
    @settings(
        max_examples=args.n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(image_files())
    def fuzz(case):
        nonlocal tried
        data, ext = case
        with tempfile.TemporaryDirectory() as tmp:
            outcome = check_readers(data, ext, Path(tmp))
        tried += 1
        for reader, how in outcome.items():
            counts[(reader, how)] += 1

    t0 = time.perf_counter()
    fuzz()
    dt = time.perf_counter() - t0
    print(f"inputs tried: {tried} in {dt:.1f} s; every one loaded as a valid tensor or was refused with a UserError")
    print(f"{'reader':<12} {'loaded':>8} {'refused':>8}")
    for reader in ("image_rgb", "image_grey", "mask", "load_pair", "read_folder"):
        print(f"{reader:<12} {counts[(reader, 'loaded')]:>8} {counts[(reader, 'refused')]:>8}")


if __name__ == "__main__":
    main()
