"""The differential check of the whole-head path against Twisted's parser
(tests/differential.py), for many heads at once:

    .venv/bin/python -m bench.differential --heads 1000000 [--seed N]

Prints how many heads were checked, how many took the whole-head path, and
the time; stops with the bytes at the first disagreement.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from tests.differential import Pair, check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    rng = random.Random(seed)
    pair = Pair()
    started, cpu = time.monotonic(), time.process_time()
    took = 0
    for done in range(1, args.heads + 1):
        took += check(pair, rng)
        if done % 100_000 == 0:
            print(f"{done:,} heads, {took:,} whole, {time.monotonic() - started:.0f} s", flush=True)
    print(
        f"seed {seed}: {args.heads:,} heads agree ({took:,} took the whole-head path) in "
        f"{time.monotonic() - started:.1f} s ({time.process_time() - cpu:.1f} s CPU)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
