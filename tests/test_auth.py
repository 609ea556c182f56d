"""Identity: dev tokens, issuer tokens (PEM and JWKS; RS256 and ES256), SMART scopes, DICOM peers, `clinphoto token`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.core.identity import (
    AuthError,
    DicomPeerRejected,
    PeerRefusal,
    TokenVerifier,
    authenticate_dicom_peer,
    dev_key_path,
    mint_dev_token,
    peer_allows,
)
from gateway.core.policy.rules import read_grant, scope_allows
from gateway.core.policy.settings import AuthSettings, DicomPeer
from gateway.settings import Settings

REPO = Path(__file__).resolve().parent.parent
NOW = datetime.now(timezone.utc)


def make_settings(tmp_path, **auth) -> Settings:
    return Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'x.db'}", auth=AuthSettings(**auth))


def pem_public(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def claims(**extra) -> dict:
    # the time of the call, not of the import: a suite run on few cores reaches some tests minutes after collection
    now = datetime.now(timezone.utc)
    base = {"iss": "https://idp.example.nhs.uk", "aud": "clinphoto", "sub": "u123", "exp": now + timedelta(minutes=5),
            "iat": now, "role": "clinician", "name": "Dr Who", "specialties": ["330", "160"], "scope": "user/Media.rs"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


# -- dev mode --------------------------------------------------------------------------------------


def test_dev_key_is_private_persistent_and_tokens_round_trip(tmp_path):
    settings = make_settings(tmp_path)
    token = mint_dev_token(settings, sub="dr.derm", role="clinician", specialties=["330"], scopes=["user/Media.rs"], name="Dr Derm")
    path = dev_key_path(settings)
    assert path == tmp_path / "auth" / "dev-signing-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a second verifier (another process, a restart) uses the same key
    subject = TokenVerifier(make_settings(tmp_path)).verify(token, "10.0.0.5")
    assert (subject.sub, subject.role, subject.specialties, subject.scopes, subject.name) == (
        "dr.derm", "clinician", ("330",), ("user/Media.rs",), "Dr Derm"
    )
    assert subject.network_address == "10.0.0.5" and subject.purpose_of_use == "TREAT"
    # a token of another data dir's key does not verify
    other = mint_dev_token(make_settings(tmp_path / "other"), sub="x", role="clinician")
    with pytest.raises(AuthError, match="signature"):
        TokenVerifier(settings).verify(other)


def test_dev_tokens_cannot_be_minted_outside_dev_mode_or_for_unknown_roles(tmp_path):
    with pytest.raises(AuthError, match="dev mode"):
        mint_dev_token(make_settings(tmp_path, mode="jwt", public_key_pem="x", issuer="https://idp", audience="clinphoto"), sub="a", role="clinician")
    for role in ("surgeon", "system"):
        with pytest.raises(AuthError, match="unknown role"):
            mint_dev_token(make_settings(tmp_path), sub="a", role=role)


def test_clinphoto_token_command_prints_a_verifiable_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env["CLINPHOTO_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", "--sub", "S", "--role", "clinician", "--specialty", "330",
         "--specialty", "160", "--scope", "patient/Media.rs", "--patient", "17", "--purpose", "train"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    subject = TokenVerifier(make_settings(tmp_path)).verify(result.stdout.strip())
    assert (subject.sub, subject.specialties, subject.scopes, subject.patient, subject.purpose_of_use) == (
        "S", ("330", "160"), ("patient/Media.rs",), "17", "TRAIN"
    )
    bad = subprocess.run([sys.executable, "-m", "gateway.cli", "token", "--sub", "S", "--role", "wizard"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown role 'wizard'" in bad.stderr


# -- issuer tokens ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rs256_with_pem_key_maps_claims(tmp_path, rsa_key):
    settings = make_settings(tmp_path, mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", public_key_pem=pem_public(rsa_key))
    verifier = TokenVerifier(settings)
    token = jwt.encode(claims(role=["staff", "medical-illustration"], specialties="330 420", scope=["user/Media.rs", "user/Patient.r"],
                              patient="9", purpose_of_use="train"), rsa_key, algorithm="RS256")
    s = verifier.verify(token)
    assert (s.sub, s.role, s.name, s.specialties, s.scopes, s.patient, s.purpose_of_use) == (
        "u123", "medical-illustration", "Dr Who", ("330", "420"), ("user/Media.rs", "user/Patient.r"), "9", "TRAIN")
    # a token without scopes gets the configured default
    assert verifier.verify(jwt.encode(claims(scope=None), rsa_key, algorithm="RS256")).scopes == ("user/*.cruds",)
    # the same key from a file
    key_file = tmp_path / "idp.pem"
    key_file.write_text(pem_public(rsa_key))
    from_file = TokenVerifier(
        make_settings(tmp_path, mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", public_key_file=key_file)
    )
    assert from_file.verify(token).sub == "u123"


@pytest.mark.parametrize("bad, message", [
    ({"iss": "https://evil.example"}, "another issuer"),
    ({"aud": "someone-else"}, "another audience"),
    ({"exp": NOW - timedelta(minutes=5)}, "expired"),
    ({"exp": None}, "exp"),
    ({"role": "surgeon"}, "no known role"),
    ({"role": "system"}, "no known role"),
    ({"role": None}, "no known role"),
])
def test_issuer_tokens_with_bad_claims_are_refused(tmp_path, rsa_key, bad, message):
    verifier = TokenVerifier(
        make_settings(tmp_path, mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", public_key_pem=pem_public(rsa_key))
    )
    with pytest.raises(AuthError, match=message):
        verifier.verify(jwt.encode(claims(**bad), rsa_key, algorithm="RS256"))


def test_algorithm_confusion_and_none_are_refused(tmp_path, rsa_key):
    pem = pem_public(rsa_key)
    verifier = TokenVerifier(make_settings(tmp_path, mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", public_key_pem=pem))
    unsigned = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(AuthError, match="not accepted"):
        verifier.verify(unsigned)
    import base64
    import hashlib
    import hmac

    # HS256 "signed" with the public key as the secret: the classic confusion attack
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    now = datetime.now(timezone.utc)
    body = json.dumps({**claims(), "exp": int((now + timedelta(minutes=5)).timestamp()), "iat": int(now.timestamp())}).encode()
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(body)}"
    forged = signing_input + "." + b64(hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest())
    with pytest.raises(AuthError, match="not accepted"):
        verifier.verify(forged)
    with pytest.raises(AuthError, match="not a JWT"):
        verifier.verify("abc.def")


def test_jwt_mode_needs_a_key_an_issuer_and_an_audience(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="jwks_url"):
        make_settings(tmp_path, mode="jwt", issuer="https://idp", audience="clinphoto")
    with pytest.raises(ValidationError, match="auth.issuer"):
        make_settings(tmp_path, mode="jwt", jwks_url="https://idp/jwks", audience="clinphoto")
    with pytest.raises(ValidationError, match="auth.audience"):
        make_settings(tmp_path, mode="jwt", jwks_url="https://idp/jwks", issuer="https://idp")
    make_settings(tmp_path, mode="jwt", jwks_url="https://idp/jwks", issuer="https://idp", audience="clinphoto")


def test_unreachable_issuer_is_503_not_401(gw, rsa_key):
    import socket

    from tests.test_photos_api import live_server

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    gw.settings.auth = AuthSettings(mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto",
                                    jwks_url=f"http://127.0.0.1:{dead}/jwks.json")
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    with live_server(gw) as api:
        r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 503 and "keys cannot be fetched" in r.json()["detail"]


@pytest.fixture
def jwks_server():
    """A real HTTP server on 127.0.0.1 serving a JWKS document (the issuer's keys)."""
    state = {"jwks": {"keys": []}, "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            state["hits"] += 1
            body = json.dumps(state["jwks"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    yield state
    server.shutdown()
    server.server_close()


def test_es256_and_rs256_from_a_jwks_url(tmp_path, jwks_server, rsa_key):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks_server["jwks"] = {"keys": [
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec-1", "use": "sig", "alg": "ES256"},
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa-1", "use": "sig", "alg": "RS256"},
    ]}
    verifier = TokenVerifier(
        make_settings(tmp_path, mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", jwks_url=jwks_server["url"])
    )
    es = jwt.encode(claims(sub="es-user"), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    rs = jwt.encode(claims(sub="rs-user"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert verifier.verify(es).sub == "es-user" and verifier.verify(rs).sub == "rs-user"
    hits = jwks_server["hits"]
    verifier.verify(es)
    assert jwks_server["hits"] == hits  # keys are cached
    stranger = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "ec-unknown"})
    with pytest.raises(AuthError, match="no key"):
        verifier.verify(stranger)
    # no kid: fine while the issuer has one key, refused when it has several
    no_kid = jwt.encode(claims(sub="no-kid"), ec_key, algorithm="ES256")
    with pytest.raises(AuthError, match="several"):
        verifier.verify(no_kid)
    jwks_server["jwks"] = {"keys": jwks_server["jwks"]["keys"][:1]}
    single = TokenVerifier(
        make_settings(tmp_path, mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", jwks_url=jwks_server["url"])
    )
    assert single.verify(no_kid).sub == "no-kid"
    # right kid, wrong key: the signature does not verify
    wrong = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(wrong)


def test_issuer_tokens_work_through_the_http_door(gw, rsa_key):
    from tests.test_photos_api import live_server

    gw.settings.auth = AuthSettings(mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", public_key_pem=pem_public(rsa_key))
    with live_server(gw) as api:
        issued = jwt.encode(claims(), rsa_key, algorithm="RS256")
        good = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers={"Authorization": f"Bearer {issued}"})
        assert good.status_code == 200 and good.json()["total"] == 0
        dev_token = mint_dev_token(gw.settings.model_copy(update={"auth": AuthSettings()}), sub="x", role="clinician")
        dev = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers={"Authorization": f"Bearer {dev_token}"})
        assert dev.status_code == 401 and 'error="invalid_token"' in dev.headers["www-authenticate"]


# -- SMART scopes --------------------------------------------------------------------------------


@pytest.mark.parametrize("scopes, any_patient, patient_only", [
    (["user/Media.rs"], True, False),
    (["user/Media.read"], True, False),
    (["system/*.rs"], True, False),
    (["user/*.cruds"], True, False),
    (["patient/Media.rs"], False, True),
    (["patient/Media.rs", "user/Media.s"], True, False),
    (["user/Media.c"], False, False),
    (["user/Media.write"], False, False),
    (["user/Patient.rs"], False, False),
    (["openid", "fhirUser", "launch/patient"], False, False),
    # a query part narrows in ways we do not enforce: the scope is skipped (grants less, never more)
    (["user/Media.rs?category=photo"], False, False),
    (["user/Media.rs?security-label=N", "patient/Media.rs"], False, True),
    (["system/*.rs?_security=N"], False, False),
    # other resource types grant no photos on this exit
    (["user/DocumentReference.rs"], False, False),
    (["user/Binary.r", "user/ImagingStudy.rs"], False, False),
    ([], False, False),
])
def test_read_grant_from_smart_scopes(scopes, any_patient, patient_only):
    grant = read_grant(scopes)
    assert (grant.any_patient, grant.patient_only) == (any_patient, patient_only)


def test_read_and_search_are_separate_smart_permissions():
    assert read_grant(["user/Media.r"], "read").any_patient and not read_grant(["user/Media.r"], "search").any_patient
    assert read_grant(["user/Media.s"], "search").any_patient and not read_grant(["user/Media.s"], "read").any_patient
    assert read_grant(["user/Media.read"], "search").any_patient and read_grant(["user/Media.rs"], "read").any_patient
    assert read_grant(["patient/Media.r", "user/Media.s"], "read").patient_only


def test_scope_allows_for_writes():
    assert scope_allows(["user/Media.cruds"], "Media", "c")
    assert scope_allows(["user/*.write"], "Media", "c")
    assert not scope_allows(["user/Media.rs"], "Media", "c")
    assert not scope_allows(["user/Patient.c"], "Media", "c")


# -- DICOM peers ---------------------------------------------------------------------------------


def peer_settings(tmp_path, **peer) -> Settings:
    base = dict(ae_title="PACS1", hosts=["127.0.0.1", "10.1.2.0/24", "localhost"], port=104, purpose_of_use="TREAT",
                sensitivities=["N", "R"], specialties=["330"], allow=["echo", "find", "get"])
    base.update(peer)
    return make_settings(tmp_path, dicom_peers=[DicomPeer(**base)])


def test_known_peer_from_its_host_gets_a_subject(tmp_path):
    settings = peer_settings(tmp_path)
    subject = authenticate_dicom_peer(settings, "PACS1  ", "10.1.2.77", called_ae=settings.ae_title)
    assert (subject.sub, subject.role, subject.specialties, subject.sensitivities, subject.purpose_of_use) == (
        "PACS1", "system", ("330",), ("N", "R"), "TREAT"
    )
    assert subject.network_address == "10.1.2.77" and subject.peer is not None and subject.peer.ae_title == "PACS1"
    assert peer_allows(subject, "find") and not peer_allows(subject, "store")
    assert authenticate_dicom_peer(settings, "PACS1", "::ffff:127.0.0.1").sub == "PACS1"


def test_unknown_peer_wrong_host_and_wrong_called_ae_are_rejected(tmp_path):
    settings = peer_settings(tmp_path)
    with pytest.raises(DicomPeerRejected, match="not a configured peer") as exc:
        authenticate_dicom_peer(settings, "STRANGER", "127.0.0.1")
    assert exc.value.kind == PeerRefusal.UNKNOWN_CALLING_AE
    with pytest.raises(DicomPeerRejected, match="may not connect from 192.168.9.9") as exc:
        authenticate_dicom_peer(settings, "PACS1", "192.168.9.9")
    assert exc.value.kind == PeerRefusal.WRONG_HOST
    with pytest.raises(DicomPeerRejected, match="called AE") as exc:
        authenticate_dicom_peer(settings, "PACS1", "127.0.0.1", called_ae="NOTUS")
    assert exc.value.kind == PeerRefusal.CALLED_AE_NOT_OURS
    with pytest.raises(DicomPeerRejected):
        authenticate_dicom_peer(settings, "pacs1", "127.0.0.1")  # AE titles compare exactly


def test_peer_settings_are_validated(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="listed twice"):
        AuthSettings(dicom_peers=[DicomPeer(ae_title="A", hosts=["127.0.0.1"]), DicomPeer(ae_title="A", hosts=["10.0.0.1"])])
    with pytest.raises(ValidationError):
        DicomPeer(ae_title="A" * 17, hosts=["127.0.0.1"])
    with pytest.raises(ValidationError):
        DicomPeer(ae_title="A", hosts=[])
    with pytest.raises(ValidationError):
        DicomPeer(ae_title="A", hosts=["127.0.0.1"], sensitivities=["V"])


def test_policy_settings_prints_a_documented_config_that_loads_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update(CLINPHOTO_DATA_DIR=str(tmp_path), CLINPHOTO_POLICY__SPECIALTY_MATCH="photo-only", CLINPHOTO_AUTH__ISSUER="https://idp.example")
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "settings"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    from gateway.core.policy.settings import PolicySettings

    for name in list(AuthSettings.model_fields) + list(PolicySettings.model_fields) + list(DicomPeer.model_fields):
        assert f"{name}:" in text, name
    assert text.count("  # ") >= len(AuthSettings.model_fields) + len(PolicySettings.model_fields)
    config = tmp_path / "clinphoto.yaml"
    config.write_text(text)
    env = {k: v for k, v in env.items() if not k.startswith("CLINPHOTO_")}
    loaded = subprocess.run(
        [sys.executable, "-c", "from gateway.settings import load_settings; s = load_settings(); "
                               "print(s.policy.specialty_match, s.auth.issuer, s.policy.role_purposes['educator'])"],
        env={**env, "CLINPHOTO_CONFIG": str(config), "CLINPHOTO_DATA_DIR": str(tmp_path)}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["photo-only", "https://idp.example", "['TRAIN']"]


def test_the_dev_demo_peer_exists_only_in_dev_mode_without_peers(tmp_path):
    from gateway.core.identity import DEMO_PEER, dicom_peers, unserved_permissions

    dev = make_settings(tmp_path)
    assert dicom_peers(dev) == [DEMO_PEER]
    assert authenticate_dicom_peer(dev, "DEMOPACS", "127.0.0.1").sub == "DEMOPACS"
    with pytest.raises(DicomPeerRejected):
        authenticate_dicom_peer(dev, "DEMOPACS", "10.0.0.1")  # loopback only
    configured = peer_settings(tmp_path)
    assert "DEMOPACS" not in {p.ae_title for p in dicom_peers(configured)}
    off = make_settings(tmp_path, dev_demo_peer=False)
    assert dicom_peers(off) == []
    # a peer allowed services the gateway does not serve yet is named at start-up: every DIMSE service is served now
    assert unserved_permissions(dev) == unserved_permissions(configured) == []
