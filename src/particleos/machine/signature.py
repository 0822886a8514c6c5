"""The one check of a signed SHA256SUMS on the machine, for URL sources (`particle update`'s
delta path) and registry sources alike: the keyring systemd-sysupdate would use (/etc first,
then /usr/lib, as systemd-import looks them up), gpgv where the image has it (registry images
ship gpgv), gpg otherwise (URL-source images ship gpg for sysupdate), and the reason read from
`--status-fd` so a refusal says why."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

KEYRINGS = (Path("/etc/systemd/import-pubring.gpg"), Path("/usr/lib/systemd/import-pubring.gpg"))


class SignatureError(Exception):
    """The signature does not verify; the message says why (one line)."""


def update_keyring(keyrings: tuple[Path, ...] = KEYRINGS) -> Path | None:
    """The keyring sysupdate checks downloads with: the first of `keyrings` that exists."""
    return next((k for k in keyrings if k.is_file()), None)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None


def verify(data: Path, signature: Path, keyring: Path, home: Path) -> str:
    """Check the detached `signature` of `data` against `keyring`; returns the signing key's
    fingerprint, or SignatureError saying why not."""
    if not keyring.is_file():
        raise SignatureError(f"{keyring} is missing: this image has no key to check updates "
                             "with")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = _run(["gpgv", "--homedir", str(home), "--status-fd", "1", "--keyring", str(keyring),
                 str(signature), str(data)])
    tool = "gpgv"
    if proc is None:
        tool = "gpg"
        proc = _run(["gpg", "--homedir", str(home), "--no-options", "--no-default-keyring",
                     "--no-auto-key-locate", "--no-auto-check-trustdb", "--batch",
                     "--trust-model=always", f"--keyring={keyring}", "--status-fd", "1",
                     "--verify", str(signature), str(data)])
    if proc is None:
        raise SignatureError("neither gpgv nor gpg is in this image (package gpgv)")
    good = re.search(r"^\[GNUPG:\] VALIDSIG (\S+)", proc.stdout, re.M)
    if proc.returncode == 0 and good:
        return good.group(1)
    if re.search(r"^\[GNUPG:\] (NO_PUBKEY|ERRSIG)", proc.stdout, re.M):
        why = "it is signed by a key this machine does not trust"
    elif re.search(r"^\[GNUPG:\] BADSIG", proc.stdout, re.M):
        why = "the signature does not match it"
    else:
        why = "the signature cannot be checked"
    last = proc.stderr.strip().splitlines()[-1:] or [f"{tool} exit status {proc.returncode}"]
    raise SignatureError(f"{why} ({last[0]})")
