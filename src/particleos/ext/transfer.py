"""sysupdate transfers for extensions, for the update code (`update/`, `build/updates.py`).

An installed extension follows base updates through its own transfer file, which
`particle ext add` writes on the machine as /etc/sysupdate.d/05-particle-ext-NAME.transfer
(sorted before the base's 10-... transfers, so the extension of version V is in the store
before V's UKI makes V bootable). It downloads `<id>-NAME_@v.raw` from the base's own source
into /var/lib/particle/extensions; at boot `particle-ext-sync.service` points
/var/lib/extensions/NAME.raw at the version of the booted base (so a rollback gets its own
extension version back). sysupdate offers only versions that every transfer can fetch: a
version published without the extension is held back, and missing_extensions() says why.
"""

from __future__ import annotations

from ..machine.sysext import (
    STORE_DIR,
    TRANSFER_DIR,
    TRANSFER_PREFIX,
    artifact_name,
    extension_transfer,
    missing_extensions,
    transfer_path,
)
from ..update.transfer import is_url

__all__ = [
    "STORE_DIR",
    "TRANSFER_DIR",
    "TRANSFER_PREFIX",
    "artifact_name",
    "extension_transfer",
    "extension_transfers",
    "held_back_message",
    "missing_extensions",
    "transfer_path",
]


def extension_transfers(image_id: str, names: list[str], source: str) -> dict[str, str]:
    """File name -> text of the transfer of each extension in `names`, for an `[update]
    source` (URL or local directory), as the machine writes them."""
    kind = "url-file" if is_url(source) else "regular-file"
    path = source if not is_url(source) or source.endswith("/") else source + "/"
    return {
        transfer_path(n).name: extension_transfer(image_id, n, kind, path) for n in names
    }


def held_back_message(image_id: str, version: str, missing: list[str]) -> str:
    """What `particle update` should say when `version` lacks some installed extensions."""
    files = ", ".join(artifact_name(image_id, n, version) for n in missing)
    return (f"update to {version} held back: the update source has no {files} for the "
            f"installed extension(s) {', '.join(missing)}; publish them (`particle build` "
            "with [extensions], or `particle ext build --base`), or `particle ext remove` them")
