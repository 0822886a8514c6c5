"""What a machine downloads to go from one published version to another: the figure
`particle publish` prints and benchmarks/delta.py reports. Counted as a machine that has the
old version's images (its slot and UKI) fetches them: SHA256SUMS and its signature, the new
version's manifest, the chunk indexes of both versions (the old ones map what it has), the
files without a chunk index whole, and each chunk the old indexes do not name, once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..formats import SHA256SUMS, SIGNATURE, ChunkIndex, chunk_index_file, read_sha256sums
from ..update.publish import version_of


@dataclass
class Delta:
    old: str
    new: str
    full_bytes: int  # the new version's images, downloaded whole
    chunk_bytes: int  # new chunks (compressed) for the images that have an index
    other_bytes: int  # indexes, SHA256SUMS, manifest, files without an index

    @property
    def delta_bytes(self) -> int:
        return self.chunk_bytes + self.other_bytes

    @property
    def ratio(self) -> float:
        return self.delta_bytes / self.full_bytes if self.full_bytes else 0.0


def version_files(update_dir: Path, image_id: str, version: str) -> list[str]:
    """The published names of one version (images, manifest, chunk indexes)."""
    return sorted(n for n in read_sha256sums(update_dir / SHA256SUMS)
                  if version_of(n, image_id) == version)


def delta(update_dir: Path, image_id: str, old: str, new: str) -> Delta:
    """Bytes to download from `update_dir` for a machine on `old` to get `new`."""
    old_names, new_names = (version_files(update_dir, image_id, v) for v in (old, new))
    have: set[str] = set()
    for name in old_names:
        if chunk_index_file(name):
            have |= ChunkIndex.read(update_dir / name).digests()

    def size(name: str) -> int:
        return (update_dir / name).stat().st_size

    other = size(SHA256SUMS) + (size(SIGNATURE) if (update_dir / SIGNATURE).is_file() else 0)
    other += sum(size(n) for n in old_names if chunk_index_file(n))
    full = 0
    indexed = {chunk_index_file(n) for n in new_names}
    wanted: dict[str, int] = {}
    for name in new_names:
        if chunk_index_file(name):
            other += size(name)
            for digest, _, stored in ChunkIndex.read(update_dir / name).chunks:
                if digest not in have:
                    wanted[digest] = stored
        elif name.endswith(".manifest.json"):
            other += size(name)
        else:
            full += size(name)
            if name not in indexed:
                other += size(name)
    chunks = sum(wanted.values())
    return Delta(old, new, full, chunks, other)
