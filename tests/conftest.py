"""Shared fixtures: every store-touching test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.core.context import Gateway
from gateway.settings import Settings
from store.audit import load_or_create_key
from store.blobs import FileBlobStore
from store.db import Database
from store.migrate import upgrade
from tests.pg_cluster import ClusterUnavailable, ThrowawayCluster, server_binaries

PG_ENV = "CLINPHOTO_TEST_POSTGRES_URL"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


_cluster: ThrowawayCluster | None = None
_cluster_url: str | None = None


def postgres_url() -> str:
    """The PostgreSQL server of this run: CLINPHOTO_TEST_POSTGRES_URL if set, else a throw-away cluster this
    process starts from the installed binaries (once, stopped when the run ends)."""
    global _cluster, _cluster_url
    url = os.environ.get(PG_ENV)
    if url:
        return url
    if _cluster_url is None:
        try:
            _cluster = ThrowawayCluster()
            _cluster_url = _cluster.start()
        except ClusterUnavailable as exc:
            if IN_CI:
                pytest.fail(f"PostgreSQL leg cannot run: {exc}")
            pytest.skip(f"PostgreSQL leg skipped: {exc}")
    return _cluster_url


def pytest_sessionfinish(session, exitstatus) -> None:
    if _cluster is not None:
        _cluster.stop()


def require_tool(name: str, package: str) -> str:
    """Path of an external tool; skipped with the reason locally, a failure under CI (.ci/run installs it)."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed: apt-get install {package}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


class _PgSchema:
    """A throw-away schema per test, so tests (and parallel runs) never see each other's rows."""

    def __init__(self, url: str) -> None:
        self.url, self.name = url, f"t_{uuid.uuid4().hex[:16]}"
        self._admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.name}"'))

    def drop(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{self.name}" CASCADE'))
        self._admin.dispose()


@pytest.fixture
def database_url(backend, tmp_path) -> str:
    """URL of a fresh empty database of the chosen backend (on PostgreSQL, a schema of its own)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'clinphoto.db'}"
        return
    schema = _PgSchema(postgres_url())
    try:
        # search_path in the URL, so a subprocess given the URL sees the same schema
        yield f"{schema.url}{'&' if '?' in schema.url else '?'}options=-csearch_path%3D{schema.name}"
    finally:
        schema.drop()


@pytest.fixture
def audit_key(tmp_path) -> bytes:
    """The same key file the `settings` fixture names, so CLI runs on tmp_path verify the chain."""
    return load_or_create_key(tmp_path / "audit.key")


@pytest.fixture
def db(database_url, audit_key, tmp_path) -> Database:
    # the anchor beside the key, as Gateway.open does
    database = Database(database_url, audit_key=audit_key, audit_anchor_dir=tmp_path)
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def blobs(tmp_path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return Settings(
        data_dir=tmp_path, database_url=database_url, blob_dir=tmp_path / "blobs",
        http_port=0, mllp_port=0, dicom_port=0,
    )


@pytest.fixture
def gw(settings, db, blobs) -> Gateway:
    return Gateway(settings=settings, db=db, blobs=blobs)


def pytest_report_header(config) -> list[str]:
    url = os.environ.get(PG_ENV)
    if url:
        return [f"PostgreSQL leg: {url.split('@')[-1]} ({PG_ENV})"]
    where = server_binaries()
    return [f"PostgreSQL leg: a throw-away cluster from {where}" if where else "PostgreSQL leg: no server binaries"]


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def validate_stored_dicom(request, tmp_path):
    """After the test: dciodvfy (zero errors), dcmdump and dcmj2pnm on every DICOM object its store holds."""
    gw = request.getfixturevalue("gw") if "gw" in request.fixturenames else None  # set up first, torn down after us
    if gw is not None:
        for tool, package in (("dciodvfy", "dicom3tools"), ("dcmdump", "dcmtk"), ("dcmj2pnm", "dcmtk")):
            require_tool(tool, package)
    yield
    if gw is not None:
        from tests.ingest_helpers import assert_stored_dicom_valid

        assert_stored_dicom_valid(gw, tmp_path)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The generated photo fixtures (fixtures/photos/make.py), once per test module."""
    from tests.ingest_helpers import photo_fixtures

    return photo_fixtures.make_all(tmp_path_factory.mktemp("photos"))
