"""Who is calling: OAuth2 bearer JWTs (RS256/ES256) -> Subject, and DICOM peers -> Subject.

Modes (settings.auth.mode):
- dev: tokens signed with an EC P-256 key kept in DATA_DIR/auth (made on first
  use); `clinphoto token` prints one.
- jwt: tokens from the hospital's issuer, verified with its JWKS URL or PEM key.
- api-key: static keys from settings.api_keys (bootstrap and tests only).

Protocol-free: the doors hand in a token or a DICOM association's AE titles and
address and get a Subject or a refusal with a kind (the HTTP door reads the
token and purpose headers, see gateway/http/security.py; the DICOM door maps
peer refusals to A-ASSOCIATE-RJ reasons). What a Subject may see is the
policy's business (gateway/core/policy/rules.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.core.policy.settings import ROLES, AuthSettings, DicomPeer, Service

if TYPE_CHECKING:
    from gateway.core.context import CoreSettings

log = logging.getLogger(__name__)
TOKEN_ROLES = tuple(r for r in ROLES if r != "system")  # "system" is reserved for DICOM peers


DicomService = Service  # the DIMSE services a peer's settings may allow


@dataclass(frozen=True)
class PeerPermissions:
    """What a DICOM peer acting as a Subject is: its AE title, and the DIMSE services its settings allow."""

    ae_title: str
    services: frozenset[DicomService] = frozenset()


@dataclass(frozen=True)
class Subject:
    """Who is asking, as every door and the policy see them: a user (from a token) or a DICOM peer."""

    sub: str
    role: str
    name: str | None = None
    specialties: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    patient: str | None = None  # the patient in context, for patient/ scopes
    purpose_of_use: str = "TREAT"
    break_glass_reason: str | None = None
    network_address: str | None = None
    # sensitivities this subject may see instead of its role's (DICOM peers); None: the role's
    sensitivities: tuple[str, ...] | None = None
    peer: PeerPermissions | None = None  # set for a DICOM peer


class AuthError(Exception):
    """A token was missing or did not verify; the message says why (safe to show the caller)."""


class AuthUnavailable(AuthError):
    """We cannot check tokens right now (bad auth settings, issuer's JWKS unreachable): 503, not the caller's fault."""


# ---------------------------------------------------------------------------
# Dev-mode signing key


def dev_key_path(settings: CoreSettings) -> Path:
    return settings.auth.dev_key_file or (Path(settings.data_dir) / "auth" / "dev-signing-key.pem")


_dev_key_lock = threading.Lock()


def dev_private_key(settings: CoreSettings) -> ec.EllipticCurvePrivateKey:
    """The dev signing key, made on first use (0600, written atomically so two processes agree on one key)."""
    path = dev_key_path(settings)
    try:
        return _dev_private_key(path)
    except (OSError, ValueError) as exc:
        # a read-only data directory, a key path that is a folder, a key file that is not PEM: a traceback from
        # `clinphoto token` before; AuthUnavailable is one line there and a 503 over HTTP
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "not a PEM private key"
        raise AuthUnavailable(f"dev signing key {path}: {why}") from None


def _dev_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    with _dev_key_lock:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if another process made the key first: keep theirs
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise AuthUnavailable(f"{path} is not an EC P-256 private key")
        return loaded


def mint_dev_token(
    settings: CoreSettings,
    *,
    sub: str,
    role: str,
    name: str | None = None,
    specialties: tuple[str, ...] | list[str] = (),
    scopes: tuple[str, ...] | list[str] | None = None,
    patient: str | None = None,
    purpose: str | None = None,
    minutes: int | None = None,
) -> str:
    """A dev-mode token (ES256, signed with the local key)."""
    if settings.auth.mode != "dev":
        raise AuthError(f"tokens can only be minted in dev mode (auth mode is {settings.auth.mode})")
    if role not in TOKEN_ROLES:
        raise AuthError(f"unknown role {role!r}; roles are {', '.join(TOKEN_ROLES)}")
    a = settings.auth
    now = datetime.now(UTC)
    claims = {
        "iss": a.dev_issuer,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + timedelta(minutes=minutes or a.dev_token_minutes),
        a.role_claim: role,
        a.specialties_claim: list(specialties),
        a.scope_claim: " ".join(scopes if scopes is not None else ("user/*.cruds",)),
    }
    if a.audience:
        claims["aud"] = a.audience
    if name:
        claims[a.name_claim] = name
    if patient:
        claims[a.patient_claim] = patient
    if purpose:
        claims[a.purpose_claim] = purpose
    return jwt.encode(claims, dev_private_key(settings), algorithm="ES256", headers={"kid": "clinphoto-dev"})


# ---------------------------------------------------------------------------
# Verification


_dev_warned: set[Path] = set()


def warn_dev_mode(key_path: Path) -> None:
    """The dev-mode warning, once per process and key: every app a process builds makes a verifier (the CLI and the
    tests build several), and the same line again says nothing new."""
    with _dev_key_lock:
        if key_path.absolute() in _dev_warned:
            return
        _dev_warned.add(key_path.absolute())
    log.warning("auth mode dev: tokens are signed with the local key in %s; use auth mode jwt in production", key_path)


class TokenVerifier:
    """Verifies bearer tokens for one set of settings; keys are loaded once (JWKS keys cached)."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.auth: AuthSettings = settings.auth
        self._static_key: Any = None  # the issuer's public key (EC or RSA) when not from a JWKS
        self._jwks: jwt.PyJWKClient | None = None
        self.algorithms: list[str] = []
        self.issuer: str | None = None
        a = self.auth
        if a.mode == "dev":
            warn_dev_mode(dev_key_path(settings))
            self._static_key = dev_private_key(settings).public_key()
            self.algorithms = ["ES256"]
            self.issuer = a.dev_issuer
        elif a.mode == "jwt":
            self.algorithms = list(a.algorithms)
            self.issuer = a.issuer
            if a.jwks_url:
                self._jwks = jwt.PyJWKClient(a.jwks_url, cache_keys=True, lifespan=max(a.jwks_cache_seconds, 1), timeout=10)
            elif a.public_key_pem or a.public_key_file:
                where = "auth.public_key_pem" if a.public_key_pem else f"auth.public_key_file ({a.public_key_file})"
                try:
                    pem = a.public_key_pem.encode() if a.public_key_pem else Path(a.public_key_file or "").read_bytes()
                    self._static_key = serialization.load_pem_public_key(pem)
                except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
                    # one line: serve turns it into "clinphoto: cannot start ..."
                    raise AuthUnavailable(f"{where} is not a readable PEM public key: {' '.join(str(exc).split())[:200]}") from None
                if not isinstance(self._static_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
                    raise AuthUnavailable(f"{where} must be an RSA or EC P-256 public key")
                # one key, one family: RS256 for RSA, ES256 for EC (a mismatched token is refused up front)
                family = "ES256" if isinstance(self._static_key, ec.EllipticCurvePublicKey) else "RS256"
                self.algorithms = [alg for alg in self.algorithms if alg == family]
                if not self.algorithms:
                    raise AuthUnavailable(f"the issuer's key needs {family}, which auth.algorithms does not allow")
            else:
                raise AuthUnavailable("auth mode jwt needs auth.jwks_url, auth.public_key_pem or auth.public_key_file")

    def ping(self) -> None:
        """Readiness: raise AuthUnavailable when tokens cannot be checked now (the issuer's JWKS cannot be
        fetched or holds no signing key). Keys are cached, so a ready probe does not hit the issuer each time."""
        if self._jwks is None:
            return
        try:
            self._jwks.get_signing_keys()
        except jwt.PyJWKClientError as exc:  # includes PyJWKClientConnectionError
            raise AuthUnavailable(f"the issuer's keys cannot be fetched ({exc})") from None

    def _key(self, token: str) -> Any:
        if self._jwks is not None:
            try:
                if "kid" not in jwt.get_unverified_header(token):
                    # issuers with a single key often leave kid out
                    keys = self._jwks.get_signing_keys()
                    if len(keys) != 1:
                        raise AuthError("the token names no key (kid) and the issuer has several") from None
                    return keys[0].key
                return self._jwks.get_signing_key_from_jwt(token).key
            except jwt.PyJWKClientConnectionError as exc:
                raise AuthUnavailable(f"the issuer's keys cannot be fetched ({exc})") from None
            except jwt.PyJWKClientError as exc:
                raise AuthError(f"no key of the issuer verifies this token ({exc})") from None
        return self._static_key

    def verify(self, token: str, network_address: str | None = None) -> Subject:
        a = self.auth
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a JWT") from None
        if header.get("alg") not in self.algorithms:
            raise AuthError(f"token algorithm {header.get('alg')!r} is not accepted (accepted: {', '.join(self.algorithms)})")
        try:
            claims = jwt.decode(
                token,
                self._key(token),
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=a.audience,
                leeway=a.leeway_seconds,
                options={"require": ["exp", "sub"], "verify_aud": bool(a.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except jwt.InvalidIssuerError:
            raise AuthError("the token is from another issuer") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the token is for another audience") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"the token is not valid: {exc}") from None
        except (TypeError, ValueError):  # a key of another family than the token's algorithm (JWKS)
            raise AuthError("the token's algorithm does not fit the issuer's key") from None
        return subject_from_claims(claims, a, network_address)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


MAX_SUB = 200  # the width of every column that records a subject (audit agent, uploader, access list)


def subject_from_claims(claims: dict[str, Any], a: AuthSettings, network_address: str | None = None) -> Subject:
    sub = str(claims["sub"])
    # refused here rather than cut later: two long subs sharing a prefix would become one person on the trail
    if not sub.strip() or len(sub) > MAX_SUB:
        raise AuthError(f"the token's sub must be 1-{MAX_SUB} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in sub):
        raise AuthError("the token's sub contains control characters")
    if sub.lower().startswith("ae:"):
        # reserved for DICOM peers on access lists (ae:AETITLE): a user must never match a peer's entry
        raise AuthError("the token's sub may not start with 'ae:' (reserved for DICOM peers)")
    roles = _as_list(claims.get(a.role_claim))
    role = next((r for r in roles if r in TOKEN_ROLES), None)
    if role is None:
        raise AuthError(f"the token names no known role in claim {a.role_claim!r} (roles: {', '.join(TOKEN_ROLES)})")
    scopes = _as_list(claims[a.scope_claim]) if a.scope_claim in claims else list(a.default_scopes)
    purpose = claims.get(a.purpose_claim)
    return Subject(
        sub=sub,
        role=role,
        name=claims.get(a.name_claim),
        specialties=tuple(_as_list(claims.get(a.specialties_claim))),
        scopes=tuple(scopes),
        patient=str(claims[a.patient_claim]) if claims.get(a.patient_claim) is not None else None,
        purpose_of_use=str(purpose).upper() if purpose else "TREAT",
        network_address=network_address,
    )


# ---------------------------------------------------------------------------
# DICOM peers: identities from settings, checked at association

class PeerRefusal(StrEnum):
    """Why an association is refused (the DICOM door maps each to an A-ASSOCIATE-RJ reason)."""

    CALLED_AE_NOT_OURS = "called-ae-not-ours"
    UNKNOWN_CALLING_AE = "unknown-calling-ae"
    WRONG_HOST = "wrong-host"


class DicomPeerRejected(Exception):
    """Association refused, with the kind of refusal."""

    def __init__(self, message: str, kind: PeerRefusal) -> None:
        super().__init__(message)
        self.kind = kind


_host_cache: dict[str, tuple[float, set[str]]] = {}


def _resolve_host(name: str) -> set[str]:
    cached = _host_cache.get(name)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    except OSError:
        found = set()
    _host_cache[name] = (time.monotonic() + 60, found)
    return found


def address_matches(address: str, hosts: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for entry in hosts:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass  # a host name
        if str(ip) in _resolve_host(entry):
            return True
    return False


DEMO_PEER = DicomPeer(ae_title="DEMOPACS", hosts=["127.0.0.1", "::1"], name="Demo PACS (dev mode)",
                      sensitivities=["N"], allow=["echo"])  # find, get and store join as the DIMSE services do
# the DIMSE services this gateway serves today: a peer allowed more is warned about at start-up
SERVED_SERVICES: frozenset[Service] = frozenset({"echo", "store", "find", "get", "move"})


def dicom_peers(settings: CoreSettings) -> list[DicomPeer]:
    """The configured peers; in dev mode with none configured, the demo peer (127.0.0.1 only)."""
    a = settings.auth
    if not a.dicom_peers and a.mode == "dev" and a.dev_demo_peer:
        return [DEMO_PEER]
    return list(a.dicom_peers)


def unserved_permissions(settings: CoreSettings) -> list[str]:
    """One line per peer allowed DIMSE services the gateway does not serve yet (said at start-up, not silently)."""
    return [f"DICOM peer {p.ae_title} is allowed {', '.join(sorted(set(p.allow) - SERVED_SERVICES))}, which this "
            f"gateway does not serve yet (it serves {', '.join(sorted(SERVED_SERVICES))})"
            for p in dicom_peers(settings) if set(p.allow) - SERVED_SERVICES]


def find_dicom_peer(settings: CoreSettings, calling_ae: str) -> DicomPeer | None:
    calling_ae = calling_ae.strip()
    return next((p for p in dicom_peers(settings) if p.ae_title == calling_ae), None)


def authenticate_dicom_peer(settings: CoreSettings, calling_ae: str, address: str, called_ae: str | None = None) -> Subject:
    """The Subject a DICOM association acts as; raises DicomPeerRejected for an unknown AE or a wrong host."""
    calling_ae = (calling_ae or "").strip()
    if called_ae is not None and called_ae.strip() != settings.ae_title:
        raise DicomPeerRejected(f"called AE title {called_ae.strip()!r} is not ours ({settings.ae_title})",
                                PeerRefusal.CALLED_AE_NOT_OURS)
    peer = find_dicom_peer(settings, calling_ae)
    if peer is None:
        raise DicomPeerRejected(f"calling AE title {calling_ae!r} is not a configured peer", PeerRefusal.UNKNOWN_CALLING_AE)
    if not address_matches(address, peer.hosts):
        raise DicomPeerRejected(f"AE {calling_ae} may not connect from {address}", PeerRefusal.WRONG_HOST)
    return peer_subject(peer, address)


def peer_subject(peer: DicomPeer, address: str | None) -> Subject:
    return Subject(
        sub=peer.ae_title,
        role="system",
        name=peer.name or peer.ae_title,
        specialties=tuple(peer.specialties),
        scopes=("system/*.cruds",),
        purpose_of_use=peer.purpose_of_use,
        network_address=address,
        sensitivities=tuple(peer.sensitivities),
        peer=PeerPermissions(ae_title=peer.ae_title, services=frozenset(peer.allow)),
    )


def peer_allows(subject: Subject, service: DicomService) -> bool:
    """May this DICOM peer use the service?"""
    return subject.peer is not None and service in subject.peer.services
