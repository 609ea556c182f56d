"""docker-compose.yml and the Dockerfile are not run here (no Docker engine), but they must be valid."""

import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parent.parent


def test_compose_file_is_valid():
    compose = require_tool("docker-compose", "docker-compose")
    result = subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert {"gateway", "postgres", "orthanc"} <= set(services)
    assert services["gateway"]["environment"]["CLINPHOTO_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_dockerfile_copies_what_exists():
    text = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for item in source.split():
            assert (REPO / item).exists(), f"Dockerfile copies missing {item}"
    assert re.search(r'^CMD \["clinphoto", "serve"\]', text, flags=re.M)
