#!/usr/bin/env python3
"""Build benchmark: cold build (no tree cache; apt archives and tools tree kept), warm build
(tree cache hit), a rebuild after adding one package, image sizes, and our dm-verity
throughput against `veritysetup format` on the same usr image.

    .venv/bin/python benchmarks/build.py [SPEC] [--package NAME]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from particleos.builder import build
from particleos.cache import cache_root
from particleos.spec import load_spec
from particleos.ui import ui
from particleos.verity import format_verity

REPO = Path(__file__).resolve().parent.parent


def timed_build(spec_path: Path, out: Path, version: str, overrides: list[str]) -> float:
    spec = load_spec(spec_path, overrides=[f"system.version={version}", *overrides])
    start = time.monotonic()
    build(spec, out)
    return time.monotonic() - start


def verity_ratio(usr: Path, runs: int = 3) -> tuple[float, float]:
    """Median MiB/s of our code and of veritysetup on the same file."""
    mib = usr.stat().st_size / (1 << 20)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            start = time.monotonic()
            format_verity(usr, Path(tmp) / "ours")
            ours.append(mib / (time.monotonic() - start))
            start = time.monotonic()
            subprocess.run(
                ["veritysetup", "format", str(usr), str(Path(tmp) / "theirs")],
                check=True, capture_output=True,
            )
            theirs.append(mib / (time.monotonic() - start))
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", nargs="?", default=str(REPO / "examples/minimal"))
    parser.add_argument("--package", default="htop", help="the package added for the rebuild")
    args = parser.parse_args()
    ui.quiet = True
    spec = Path(args.spec)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        # A private cache, so "cold" never deletes trees other builds are using; the tools
        # tree and the apt archives are shared (they are not what this measures).
        shared = cache_root()
        os.environ["PARTICLE_CACHE_DIR"] = str(Path(tmp) / "cache")
        for part in ("tools", "apt-archives"):
            (shared / part).mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "cache").mkdir(exist_ok=True)
            (Path(tmp) / "cache" / part).symlink_to(shared / part)
        out = Path(tmp)
        cold = timed_build(spec, out / "cold", "1", [])
        warm = timed_build(spec, out / "warm", "2", [])
        base = load_spec(spec).packages.install
        plus = timed_build(spec, out / "plus", "3", [f"packages.install={[*base, args.package]!r}"
                                                      .replace("'", '"')])
        name = f"{load_spec(spec).system.id}_2"
        disk = out / "warm" / f"{name}.raw"
        usr = out / "warm" / f"{name}.usr.raw"
        uki = out / "warm" / f"{name}.efi"
        ours, theirs = verity_ratio(usr)
        used = int(subprocess.run(["du", "-B1", str(disk)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        print(f"cold build (no tree cache):        {cold:7.1f} s")
        print(f"warm build (tree cache hit):       {warm:7.1f} s   ({cold / warm:.1f}x faster)")
        print(f"rebuild after adding {args.package!r}: {plus:7.1f} s")
        print(f"disk image: {disk.stat().st_size / 2**30:.2f} GiB apparent, "
              f"{used / 2**20:.0f} MiB allocated (sparse)")
        print(f"usr image:  {usr.stat().st_size / 2**20:.1f} MiB; "
              f"UKI {uki.stat().st_size / 2**20:.1f} MiB")
        print(f"verity: ours {ours:.0f} MiB/s, veritysetup {theirs:.0f} MiB/s, "
              f"ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
