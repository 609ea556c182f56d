"""A broken jwt setup stops start-up (settings, bad PEM), and /readyz says when tokens cannot be checked."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import httpx
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.policy.settings import AuthSettings
from tests.conftest import require_tool
from tests.test_auth import claims, jwks_server, pem_public  # noqa: F401 (jwks_server: a real JWKS endpoint)
from tests.test_photos_api import live_server
from tests.test_serve import CLI, REPO, gateway_env, wait_healthy


def dead_url() -> str:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/jwks.json"


def run_serve(tmp_path, **env) -> subprocess.CompletedProcess:
    start = time.monotonic()
    result = subprocess.run([*CLI, "serve"], env=gateway_env(tmp_path, **env), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    return result


def test_jwt_mode_without_a_key_does_not_start(tmp_path):
    result = run_serve(tmp_path, CLINPHOTO_AUTH__MODE="jwt")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth mode jwt needs" in lines[0] and "jwks_url" in lines[0], result.stderr
    assert "auth.issuer" in lines[0] and "auth.audience" in lines[0]


def test_bad_pem_key_fails_start_up_with_one_line(tmp_path):
    result = run_serve(tmp_path, CLINPHOTO_AUTH__MODE="jwt", CLINPHOTO_AUTH__ISSUER="https://idp.example.nhs.uk",
                       CLINPHOTO_AUTH__AUDIENCE="clinphoto",
                       CLINPHOTO_AUTH__PUBLIC_KEY_PEM="-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("clinphoto: cannot start") and "auth.public_key_pem is not a readable PEM public key" in lines[-1]
    missing = run_serve(tmp_path, CLINPHOTO_AUTH__MODE="jwt", CLINPHOTO_AUTH__ISSUER="https://idp.example.nhs.uk",
                        CLINPHOTO_AUTH__AUDIENCE="clinphoto", CLINPHOTO_AUTH__PUBLIC_KEY_FILE=str(tmp_path / "no-such.pem"))
    assert missing.returncode == 1 and "cannot start" in missing.stderr and "no-such.pem" in missing.stderr


def test_readyz_includes_auth(gw, jwks_server):  # noqa: F811
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    gw.settings.auth = AuthSettings(mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", jwks_url=dead_url())
    with live_server(gw) as api:
        r = api.get("/readyz")
        assert r.status_code == 503 and r.json()["failing"] == {"auth": "AuthUnavailable"}
        assert api.get("/healthz").status_code == 200
    jwks_server["jwks"] = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": "k1", "use": "sig"}]}
    gw.settings.auth = AuthSettings(mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", jwks_url=jwks_server["url"])
    with live_server(gw) as api:
        assert api.get("/readyz").json() == {"status": "ready"}
        hits = jwks_server["hits"]
        api.get("/readyz")
        assert jwks_server["hits"] == hits  # keys are cached: probes do not hammer the issuer
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "k1"})
        r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        jwks_server["jwks"] = {"keys": []}  # the issuer publishes no signing key any more (and the cache expires)
    gw.settings.auth = AuthSettings(mode="jwt", issuer="https://idp.example.nhs.uk", audience="clinphoto", jwks_url=jwks_server["url"])
    with live_server(gw) as api:
        assert api.get("/readyz").status_code == 503


def test_serve_with_pem_key_is_ready(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    env = gateway_env(tmp_path, CLINPHOTO_AUTH__MODE="jwt", CLINPHOTO_AUTH__ISSUER="https://idp.example.nhs.uk",
                      CLINPHOTO_AUTH__AUDIENCE="clinphoto", CLINPHOTO_AUTH__PUBLIC_KEY_PEM=pem_public(key), CLINPHOTO_LISTENERS='["http"]')
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{env['CLINPHOTO_HTTP_PORT']}"
    try:
        wait_healthy(base, proc)
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_compose_gateway_is_a_valid_jwt_configuration():
    compose = require_tool("docker-compose", "docker-compose")
    result = subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), "config"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    env = yaml.safe_load(result.stdout)["services"]["gateway"]["environment"]
    auth = {k.removeprefix("CLINPHOTO_AUTH__").lower(): v for k, v in env.items() if k.startswith("CLINPHOTO_AUTH__")}
    settings = AuthSettings(**auth)  # raises if jwt mode is incomplete
    assert settings.mode == "jwt" and settings.issuer and settings.audience and settings.jwks_url
    assert subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True).returncode == 0


def test_the_dev_mode_warning_is_logged_once_per_process_and_key(tmp_path, caplog):
    from gateway.core.identity import TokenVerifier
    from gateway.settings import Settings

    caplog.set_level("WARNING")
    settings = Settings(data_dir=tmp_path)
    for _ in range(3):  # as each app, and each gateway opened in one process, makes its verifier
        TokenVerifier(settings)
    other = settings.model_copy(update={"auth": settings.auth.model_copy(update={"dev_key_file": tmp_path / "other.pem"})})
    TokenVerifier(other)
    TokenVerifier(other)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth mode dev")]
    assert len(warned) == 2 and str(tmp_path / "other.pem") in warned[1], warned
