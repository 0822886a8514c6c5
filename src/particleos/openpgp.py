"""OpenPGP through Debian's gpg: the update-signing key, detached signatures of SHA256SUMS and
the public keyring an image carries as /usr/lib/systemd/import-pubring.gpg.

systemd-sysupdate (through systemd-pull) verifies SHA256SUMS.gpg by running gpg against that
keyring; there is no other format it accepts, so this is the one place we drive gpg. Every call
uses a throw-away GNUPGHOME, so the user's own keyring is never read or changed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from . import runner
from .cache import atomic_file
from .errors import CommandError, ParticleError

_BASE = ("--batch", "--no-tty", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "")


@contextlib.contextmanager
def gpg_home() -> Iterator[Path]:
    """A private, short-lived GNUPGHOME (short path: gpg-agent's socket lives in it)."""
    home = Path(tempfile.mkdtemp(prefix="particle-gpg-"))
    os.chmod(home, 0o700)
    try:
        yield home
    finally:
        if shutil.which("gpgconf"):
            runner.run(["gpgconf", "--homedir", home, "--kill", "all"], what="gpgconf --kill",
                       check=False)
        shutil.rmtree(home, ignore_errors=True)


def _gpg(home: Path, *args: str | os.PathLike[str], what: str) -> bytes:
    return runner.run(["gpg", "--homedir", home, *_BASE, *args], capture=True, what=what).stdout


def generate(uid: str) -> tuple[bytes, bytes]:
    """A new ed25519 signing key: (armored secret key, binary public keyring)."""
    with gpg_home() as home:
        _gpg(home, "--quick-generate-key", uid, "ed25519", "sign", "never",
             what="gpg --quick-generate-key")
        secret = _gpg(home, "--armor", "--export-secret-keys", what="gpg --export-secret-keys")
        public = _gpg(home, "--export", what="gpg --export")
    if not secret or not public:
        raise ParticleError("gpg created no key (is gnupg installed and working?)")
    return secret, public


def _import(home: Path, key_file: Path) -> None:
    if not key_file.is_file():
        raise ParticleError(
            f"signing.openpgp_key: {key_file} does not exist (create it with `particle genkey`)"
        )
    try:
        _gpg(home, "--import", key_file, what=f"gpg --import {key_file.name}")
    except CommandError as err:
        raise ParticleError(
            f"signing.openpgp_key: {key_file} is not an OpenPGP key gpg can read\n{err.stderr}"
        ) from None


def public_keyring(key_file: Path) -> bytes:
    """The binary public keyring of `key_file` (a secret or public key): what goes into an
    image. Only public key packets are exported, whatever the input holds."""
    with gpg_home() as home:
        _import(home, key_file)
        return _gpg(home, "--export", what="gpg --export")


def sign_detached(key_file: Path, path: Path, signature: Path | None = None) -> Path:
    """Write `path`.gpg (binary detached signature), atomically: a reader sees the old
    signature or the new one, never a partial file."""
    out = signature or path.with_name(path.name + ".gpg")
    with gpg_home() as home:
        _import(home, key_file)
        with atomic_file(out) as tmp:
            _gpg(home, "--yes", "--output", tmp, "--detach-sign", path,
                 what=f"gpg --detach-sign {path.name}")
    return out


def signer(key_file: Path) -> Callable[[Path], None]:
    """The `sign` hook for `particle publish`: called with SHA256SUMS before the index is
    renamed into place, it writes SHA256SUMS.gpg next to it."""

    def sign(path: Path) -> None:
        sign_detached(key_file, path)

    return sign


def verify(keyring: Path, data: Path, signature: Path) -> bool:
    """What the machine does (gpg against import-pubring.gpg), for checks on the host."""
    proc = runner.run(
        ["gpgv", "--keyring", keyring.resolve(), signature, data], what="gpgv", check=False
    )
    return proc.returncode == 0


def fingerprints(keyring: Path) -> list[str]:
    """Primary key fingerprints in a keyring file (what `gpg --show-keys` lists)."""
    with gpg_home() as home:
        out = _gpg(home, "--with-colons", "--show-keys", keyring, what="gpg --show-keys")
    lines = [ln.split(":") for ln in out.decode().splitlines()]
    # An "fpr" record follows each "pub" (primary) and "sub" record; keep the primary ones.
    return [f[9] for prev, f in itertools.pairwise(lines) if prev[0] == "pub" and f[0] == "fpr"]
