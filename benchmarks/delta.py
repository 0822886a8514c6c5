#!/usr/bin/env python3
"""Delta update benchmark (issue 11): builds v1, v2 = v1 + one package, v3 = v2 + two more
(the layered cache makes v2 and v3 quick), publishes them into one update directory with its
chunk store, and prints what a machine downloads (full vs delta, v1->v2, v2->v3, v1->v3
skipping v2), how much each version adds to the store, and the chunk and reconstruct speeds
(v2's images rebuilt from v1's and the store, checked against their sha256).

    .venv/bin/python benchmarks/delta.py [SPEC] [--package htop] [--more strace tmux]
                                          [--work DIR]

With --work DIR the builds and the update directory are kept there (and reused: a version
already built there is not built again).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from particleos.builder import build
from particleos.formats import ChunkIndex, chunk_index_file, chunk_path, decode_chunk
from particleos.machine import delta as machine_delta
from particleos.spec import load_spec
from particleos.store.chunker import chunks
from particleos.store.delta import delta, version_files
from particleos.store.store import params_for
from particleos.update.publish import publish

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def build_version(spec_path: Path, out: Path, version: str, extra: list[str]) -> Path:
    if list(out.glob(f"*_{version}.manifest.json")):
        print(f"v{version}: already built in {out}")
        return out
    spec = load_spec(spec_path, overrides=[f"system.version={version}"])
    packages = [*spec.packages.install, *extra]
    spec = load_spec(spec_path, overrides=[f"system.version={version}",
                                           f"packages.install={json.dumps(packages)}"])
    start = time.monotonic()
    build(spec, out)
    print(f"v{version}: built in {time.monotonic() - start:.0f} s (+{' '.join(extra) or '-'})")
    return out


def speeds(size: int, wall: float, cpu: float) -> str:
    """MiB/s by the wall clock and per CPU second (this process's threads): on a shared
    machine the second is the one that says what the code costs."""
    return f"{size / wall / MiB:.0f} MiB/s ({size / cpu / MiB:.0f} MiB per CPU second)"


def chunk_speed(path: Path) -> str:
    """Cutting and hashing alone (what every publish does for every image)."""
    start, cpu = time.monotonic(), time.process_time()
    size = sum(len(c.data) for c in chunks(path, params_for(path.name)))
    return speeds(size, time.monotonic() - start, time.process_time() - cpu)


def reconstruct_speed(srv: Path, image_id: str, old: str, new: str, seeded: bool
                      ) -> tuple[str, int]:
    """Rebuild every indexed image of `new` (seeds: `old`'s images with their indexes, or
    none) with the code machines run (machine.delta: seed chunks checked, fetched chunks
    decoded and checked, the file written, fsynced and hashed), chunks read from the store's
    files instead of curl; returns MiB/s and the bytes read from the store."""
    old_names = version_files(srv, image_id, old)
    seeds = [machine_delta.Seed(str(srv / f), ChunkIndex.read(srv / n), f)
             for n in old_names if (f := chunk_index_file(n))] if seeded else []
    locations = machine_delta.seed_locations(seeds)

    def fetch_chunks(missing: list[tuple[str, int, int]]) -> Iterator[tuple[str, bytes]]:
        for digest, size, _ in missing:
            yield digest, decode_chunk(chunk_path(srv, digest).read_bytes(), digest, size)

    total = fetched = 0
    start, cpu = time.monotonic(), time.process_time()
    with tempfile.TemporaryDirectory(dir=srv.parent) as out:
        for name in version_files(srv, image_id, new):
            if not chunk_index_file(name):
                continue
            index = ChunkIndex.read(srv / name)
            result = machine_delta.reconstruct(index, index.sha256, Path(out) / index.file,
                                               locations, fetch_chunks, lambda _: None)
            total += index.size
            fetched += result.fetched_stored
    return speeds(total, time.monotonic() - start, time.process_time() - cpu), fetched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", nargs="?", default=str(REPO / "examples/minimal"))
    parser.add_argument("--package", default="htop", help="what v2 adds")
    parser.add_argument("--more", nargs="*", default=["strace", "tmux"], help="what v3 adds")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    spec = Path(args.spec)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        outs = {
            "1": build_version(spec, work / "v1", "1", []),
            "2": build_version(spec, work / "v2", "2", [args.package]),
            "3": build_version(spec, work / "v3", "3", [args.package, *args.more]),
        }
        srv = work / "srv"
        results, cpu = {}, {}
        for v, out in outs.items():
            started = time.process_time()
            results[v] = publish(out, srv, version=v)
            cpu[v] = time.process_time() - started
        image_id = results["1"].image_id
        print()
        for v, r in results.items():
            size = sum(s.size for s in r.chunked)
            secs = sum(s.seconds for s in r.chunked)
            added = sum(s.new_stored_bytes for s in r.chunked)
            if not r.chunked:
                print(f"v{v}: already in the store (use a fresh --work to measure again)")
                continue
            print(f"v{v}: full update {mib(r.update_bytes)}; store +{mib(added)} "
                  f"({100 * added / r.update_bytes:.1f} % of a full version); "
                  f"{sum(s.chunks for s in r.chunked)} chunks, "
                  f"{sum(s.new_chunks for s in r.chunked)} new; put {speeds(size, secs, cpu[v])}")
        print()
        for old, new in (("1", "2"), ("2", "3"), ("1", "3")):
            d = delta(srv, image_id, old, new)
            print(f"v{old} -> v{new}: full {mib(d.full_bytes)}, delta {mib(d.delta_bytes)} "
                  f"({100 * d.ratio:.1f} %: chunks {mib(d.chunk_bytes)}, indexes and small "
                  f"files {mib(d.other_bytes)})")
        print()
        usr = next(p for p in outs["2"].glob("*_2.usr.raw"))
        print(f"chunk (cut + sha256) {usr.name}: {chunk_speed(usr)}")
        speed, fetched = reconstruct_speed(srv, image_id, "1", "2", seeded=True)
        print(f"reconstruct v2 from v1 + store: {speed}; {mib(fetched)} from the store")
        speed, fetched = reconstruct_speed(srv, image_id, "1", "2", seeded=False)
        print(f"reconstruct v2 from the store alone: {speed}; {mib(fetched)}")


if __name__ == "__main__":
    main()
