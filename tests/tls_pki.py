"""A throwaway certificate authority for TLS tests, made with the openssl command: a CA, a certificate for
127.0.0.1 (server and client use) and a client's, each signed by it, and a rogue CA's certificate for 127.0.0.1 that
nothing here trusts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool

_LEAF_EXTENSIONS = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")


@dataclass(frozen=True)
class Pair:
    key: Path
    cert: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the trusted CA's certificate
    server: Pair  # for 127.0.0.1, signed by the CA
    client: Pair  # a peer's, signed by the CA
    rogue: Pair  # for 127.0.0.1, signed by a CA nobody trusts


def _openssl(*args: str | Path) -> None:
    run = subprocess.run([require_tool("openssl", "openssl"), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def _ca(folder: Path, name: str) -> Pair:
    pair = Pair(folder / f"{name}.key", folder / f"{name}.crt")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", pair.key,
             "-out", pair.cert, "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def _leaf(folder: Path, name: str, ca: Pair) -> Pair:
    pair = Pair(folder / f"{name}.key", folder / f"{name}.crt")
    csr, extensions = folder / f"{name}.csr", folder / f"{name}.ext"
    extensions.write_text(_LEAF_EXTENSIONS)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", pair.key, "-out", csr)
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial", "-days", "2",
             "-extfile", extensions, "-out", pair.cert)
    return pair


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = _ca(folder, "ca"), _ca(folder, "rogue-ca")
    return Pki(ca=ca.cert, server=_leaf(folder, "server", ca), client=_leaf(folder, "client", ca),
               rogue=_leaf(folder, "rogue", rogue_ca))
