"""Throughput of our dm-verity hash tree against `veritysetup format` on the same file.

Usage: python benchmarks/verity.py [SIZE_MIB]   (default 256)

Both read the data from the page cache (it was just written), so this compares hashing speed,
not the disk. Each is timed 3 times; the median is reported.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from particleos.runner import run
from particleos.verity import DEFAULT_SALT, format_verity

RUNS = 3


def median_seconds(action: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    size_mib = int(argv[1]) if len(argv) > 1 else 256
    with tempfile.TemporaryDirectory(prefix="verity-bench-") as tmp:
        data, ours, theirs = Path(tmp, "data"), Path(tmp, "ours.hash"), Path(tmp, "theirs.hash")
        with open(data, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))

        ours_s = median_seconds(lambda: format_verity(data, ours))
        salt = DEFAULT_SALT.hex()
        argv_vs: list[str | Path] = ["veritysetup", "format", "--salt", salt, data, theirs]
        theirs_s = median_seconds(lambda: run(argv_vs, capture=True))

    ours_rate, theirs_rate = size_mib / ours_s, size_mib / theirs_s
    print(f"data:        {size_mib} MiB, median of {RUNS} runs each")
    print(f"ours:        {ours_s:7.3f} s  {ours_rate:8.0f} MiB/s")
    print(f"veritysetup: {theirs_s:7.3f} s  {theirs_rate:8.0f} MiB/s")
    print(f"ratio ours/veritysetup (throughput): {ours_rate / theirs_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
