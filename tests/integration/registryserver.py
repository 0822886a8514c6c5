"""A real OCI registry for the tests: Debian's docker-registry (Docker's distribution) on
127.0.0.1 with its own storage directory and access log, optionally with htpasswd or a Bearer
token service; and build output directories small enough to push in milliseconds."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from particleos.formats import format_sha256sums, read_sha256sums

REGISTRY_BIN = shutil.which("docker-registry")
USER, PASSWORD = "fleet", "s3cret-pass"

needs_registry = pytest.mark.skipif(REGISTRY_BIN is None,
                                    reason="docker-registry is not installed (scripts/setup)")


@dataclass
class RegistryServer:
    host: str  # 127.0.0.1:PORT
    storage: Path
    log: Path

    def access_log(self) -> list[str]:
        """The requests the registry served, from its own log (method path status)."""
        return re.findall(r'"(HEAD|GET|POST|PUT|PATCH) (\S+) HTTP/1.1" (\d+)',
                          self.log.read_text())

    def stored_blobs(self) -> set[str]:
        root = self.storage / "docker/registry/v2/blobs/sha256"
        return {p.name for p in root.glob("*/*") if (p / "data").is_file()}


def start_registry(tmp: Path, *, htpasswd: bool, auth: str = "") -> Iterator[RegistryServer]:
    assert REGISTRY_BIN is not None
    tmp.mkdir(parents=True)
    if htpasswd:
        passwd = tmp / "htpasswd"
        out = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                             capture_output=True, text=True).stdout
        passwd.write_text(out)
        auth = f"auth:\n  htpasswd:\n    realm: particle-test\n    path: {passwd}\n"
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
        "http:\n  addr: 127.0.0.1:0\n" + auth
    )
    log = tmp / "registry.log"
    with log.open("wb") as out_f:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out_f,
                                stderr=subprocess.STDOUT)
    try:
        host = None
        for _ in range(200):
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text()):
                host = f"127.0.0.1:{m.group(1)}"
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert host, log.read_text()
        yield RegistryServer(host, tmp / "storage", log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)




def fake_build(out: Path, version: str, *, usr: bytes, uki: bytes, image_id: str = "demo") \
        -> Path:
    """A build output directory as `particle build` leaves it (small files, real names)."""
    out.mkdir(parents=True, exist_ok=True)
    root_hash = hashlib.sha256(usr).hexdigest()
    stem = f"{image_id}_{version}"
    files = {
        f"{stem}.usr.raw": usr,
        f"{stem}.usr-verity.raw": b"verity " + usr,
        f"{stem}.efi": uki,
        f"{stem}.manifest.json": json.dumps({"id": image_id, "version": version, "root_hash":
                                             root_hash, "usr_filesystem": "erofs"}).encode(),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    sums = read_sha256sums(out / "SHA256SUMS")
    sums.update({n: hashlib.sha256(d).hexdigest() for n, d in files.items()})
    (out / "SHA256SUMS").write_text(format_sha256sums(sums))
    return out




class TokenService:
    """The token server of the distribution spec's Bearer flow: checks the user's password
    and answers an ES256 JWT granting what was asked, signed by a key whose self-signed
    certificate the registry trusts (`auth: token` with `rootcertbundle`)."""

    def __init__(self, tmp: Path) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "particle test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(1)
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = tmp / "token-ca.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.scopes: list[str] = []
        self.server = self._serve()
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def _token(self, scope: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        _, name, actions = scope.split(":")
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": "particle-test-issuer", "sub": USER, "aud": "particle-test",
                  "exp": now + 300, "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
                  "access": [{"type": "repository", "name": name,
                              "actions": actions.split(",")}]}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _serve(self) -> Any:
        import http.server
        import threading
        import urllib.parse

        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                scope = query["scope"][0]
                service.scopes.append(scope)
                body = json.dumps({"token": service._token(scope)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
