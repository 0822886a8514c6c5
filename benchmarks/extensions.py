"""Extension build time against a full rebuild, and extension size against the packages.

Usage: python benchmarks/extensions.py [--cold] [--json] [PKG...]   (default: gcc make libc6-dev)

1. `particle build` of the extension test base (tests/integration/specs/extbase) without
   extensions: the base that is already deployed.
2. `particle ext build --base OUT devtools PKG...`: the fast path, after the fact.
3. `particle build` of the same base with `[extensions.devtools]` in the spec: what a full
   rebuild costs to get the same extension (the bootstrap tree comes from the cache).
4. With --cold, 3 again with a bootstrap cache miss (one more base package changes the tree
   key; the apt archives stay warm), as after a change to the package list.

Sizes: the extension image against the .deb files of the packages it adds and their installed
size. All builds go to a temporary directory; the apt and tree caches are the usual ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from particleos.builder import build
from particleos.cache import cache_root, remove_tree
from particleos.ext.cli import build_for_base
from particleos.spec import load_spec
from particleos.ui import ui

SPEC = Path(__file__).resolve().parent.parent / "tests/integration/specs/extbase"


def timed_build(out: Path, version: str, overrides: list[str]) -> tuple[float, dict[str, object]]:
    spec = load_spec(SPEC, overrides=[f"system.version={version}", *overrides])
    start = time.monotonic()
    result = build(spec, out)
    return time.monotonic() - start, {"cache_hit": result.cache_hit, "timings": result.timings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", default=["gcc", "make", "libc6-dev"])
    ap.add_argument("--cold", action="store_true", help="also time a bootstrap cache miss")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ui.quiet = True
    pkgs = json.dumps(args.packages)
    figures: dict[str, object] = {"packages": args.packages}
    with tempfile.TemporaryDirectory(prefix="particle-bench-") as tmp:
        base_out = Path(tmp) / "base"
        figures["base_build_s"], _ = timed_build(base_out, "1.0.0", [])
        fast = build_for_base(base_out, "devtools", args.packages)
        figures["ext_build_s"] = fast.seconds
        r = fast.result
        figures.update(root_hash=r.root_hash, image_bytes=r.image_bytes, deb_bytes=r.deb_bytes,
                       installed_bytes=r.installed_bytes, data_bytes=r.data_bytes,
                       new_packages=len(r.packages), files=r.files)
        full_s, full = timed_build(Path(tmp) / "full", "1.0.1",
                                   [f"extensions.devtools.packages={pkgs}"])
        figures["full_rebuild_s"] = full_s
        figures["full_rebuild_cache_hit"] = full["cache_hit"]
        if args.cold:
            trees_before = set((cache_root() / "trees").iterdir())
            cold_s, cold = timed_build(
                Path(tmp) / "cold", "1.0.2",
                [f"extensions.devtools.packages={pkgs}",
                 'packages.install=["less", "sudo", "file"]'])
            figures["cold_rebuild_s"] = cold_s
            figures["cold_rebuild_cache_hit"] = cold["cache_hit"]
            # The extra tree would otherwise stay in the cache for nothing.
            for tree in set((cache_root() / "trees").iterdir()) - trees_before:
                remove_tree(tree)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    mib = 2**20
    print(f"packages: {' '.join(args.packages)} -> {figures['new_packages']} new packages")
    print(f"  base build (no extension):          {figures['base_build_s']:6.1f} s")
    print(f"  particle ext build --base:          {figures['ext_build_s']:6.1f} s")
    print(f"  full rebuild with the extension:    {figures['full_rebuild_s']:6.1f} s "
          f"(bootstrap cache {'hit' if figures['full_rebuild_cache_hit'] else 'miss'})")
    if args.cold:
        print(f"  full rebuild, bootstrap cache miss: {figures['cold_rebuild_s']:6.1f} s")
    print(f"  extension image: {r.image_bytes / mib:.1f} MiB; its packages: "
          f"{r.deb_bytes / mib:.1f} MiB of .deb, {r.installed_bytes / mib:.1f} MiB installed; "
          f"kept under /usr: {r.data_bytes / mib:.1f} MiB in {r.files} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
