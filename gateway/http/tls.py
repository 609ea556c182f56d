"""TLS contexts from the PEM files the settings name, for the doors that speak TLS (HTTP here; DICOM: gateway/dicom/
tls.py): TLS 1.2 or later (BCP 195), and a file that cannot be used is one line naming its setting, at start-up."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


class TlsSetupError(Exception):
    """A TLS certificate, key or CA bundle in the settings cannot be used; the message names the setting."""


def load(what: str, loader: Any, *args: Any) -> None:
    """`loader(*args)` (an SSLContext's load_cert_chain or load_verify_locations), its failure a TlsSetupError
    naming `what` (the setting) and the file."""
    try:
        loader(*args)
    except (OSError, ssl.SSLError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TlsSetupError(f"{what} {args[0]}: {why}") from None


def context(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    return ctx


def _no_passphrase() -> bytes:
    # OpenSSL's own prompt otherwise: start-up read a passphrase from the terminal (or whatever its stdin was), and
    # each routing or C-MOVE association loading our key again read it there too; with none, "Invalid argument"
    raise ValueError("the private key is encrypted (a passphrase is asked for): give the gateway an unencrypted key "
                     "that only it can read")


def load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None, setting: str) -> None:
    """Our certificate and its key into `ctx`; an encrypted key is refused, never prompted for. Each file is named
    by its own setting when it is missing, and OpenSSL's "PEM lib" (a file that is not the certificate and key it
    should be) is said in words."""
    key_setting = setting.removesuffix("_cert") + "_key"
    for path, name in ((cert, setting), (key, key_setting)):
        if path is not None and not Path(path).is_file():
            raise TlsSetupError(f"{name} {path}: " + ("is not a file" if Path(path).exists() else "No such file or directory"))
    try:
        load(setting, ctx.load_cert_chain, cert, key, _no_passphrase)
    except TlsSetupError as exc:
        if "PEM lib" not in str(exc):
            raise
        raise TlsSetupError(f"{setting} {cert}" + (f" with {key_setting} {key}" if key else "") + ": not a PEM certificate "
                            "and its private key (the key in the certificate's file, or in the file " + key_setting
                            + " names)") from None


def server_context(cert: Path | None, key: Path | None, setting: str) -> ssl.SSLContext | None:
    """A listener's context for the certificate `setting` names, or None without one (plain TCP)."""
    if cert is None:
        return None
    ctx = context(ssl.Purpose.CLIENT_AUTH)
    load_chain(ctx, cert, key, setting)
    return ctx
