"""Gateway settings: defaults < YAML file named by CLINPHOTO_CONFIG < CLINPHOTO_* environment."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from gateway.capture.settings import CaptureSettings
from gateway.core import patient_refs
from gateway.core.ingest.config import IngestSettings
from gateway.core.policy.settings import AuthSettings, PolicySettings
from gateway.core.routing import RoutingSettings
from gateway.dicomweb.config import DicomwebSettings
from gateway.hl7.config import Hl7Settings
from gateway.viewer.settings import ViewerSettings
from store.db import DatabaseUrlError, check_url

ENV_PREFIX = "CLINPHOTO_"


class SettingsError(Exception):
    """A setting is wrong; the message is one line naming it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(Path("./var"), description="Where the embedded database, blobs and dev keys live.")
    database_url: str = Field("", description="SQLAlchemy URL; default a SQLite file in DATA_DIR. PostgreSQL: postgresql+psycopg://user:pw@host/db")
    blob_dir: Path = Field(default_factory=lambda data: Path(data["data_dir"]) / "blobs",
                           description="Blob store folder; default DATA_DIR/blobs.")
    audit_key_file: Path = Field(
        default_factory=lambda data: Path(data["data_dir"]) / "audit.key",
        description="HMAC key of the audit hash chain; default DATA_DIR/audit.key, made on first start. Keep it outside the database and back it up.",
    )
    http_host: str = Field("127.0.0.1", description="Address the HTTP API (REST, FHIR, DICOMweb, viewer) listens on.")
    http_port: int = Field(8080, ge=0, le=65535)
    http_max_connections: int = Field(
        1000, ge=1,
        description="Most HTTP connections open at once; further ones wait in the listen backlog until one closes "
        "(logged). Lowered at start-up if the process's open-file limit could not hold them beside the other doors.",
    )
    http_read_timeout: float = Field(
        60.0, gt=0, le=3600,
        description="Seconds a client may take to send a request head, and may leave a request body without a byte; "
        "a slower one is answered 408 and closed (nginx's client_header_timeout and client_body_timeout), so idle or "
        "trickling connections cannot hold the door's connections.",
    )
    http_tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain): with it the HTTP door (REST, FHIR, DICOMweb, viewer, capture, console) "
        "speaks HTTPS only (TLS 1.2 or later). Without it, put a TLS-terminating proxy in front before it leaves the host.",
    )
    http_tls_key: Path | None = Field(None, description="PEM private key of http_tls_cert (unless in the certificate's file).")
    mllp_port: int = Field(2575, ge=0, le=65535, description="HL7 v2 MLLP listener port.")
    dicom_port: int = Field(11112, ge=0, le=65535, description="DICOM DIMSE listener port.")
    dicom_host: str | None = Field(
        None, description="Address the DICOM listener binds; default the HTTP address (use 0.0.0.0 for peers on other hosts).",
    )
    dicom_pending_interval: float = Field(
        1.0, ge=0, le=25,
        description="Seconds between pending C-GET/C-MOVE responses during a retrieve (0: one after every "
        "sub-operation). The final response always carries the counts.",
    )
    dicom_idle_timeout: float = Field(
        60.0, gt=0, le=3600,
        description="Seconds a DICOM association may sit with neither side sending before it is aborted (a request "
        "being served, however long, is not idle).",
    )
    dicom_max_associations: int = Field(
        10, ge=1, le=1000,
        description="DICOM associations served at once; one more is rejected as transient (local limit exceeded), "
        "so the peer tries again later.",
    )
    ae_title: str = Field("CLINPHOTO", min_length=1, max_length=16, description="Our DICOM AE title.")
    dicom_tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) of the DICOM listener: with it the listener speaks TLS only (DICOM PS3.15 "
        "B.9, BCP 195: TLS 1.2 or later), and it is the certificate presented to peers reached with `tls`.",
    )
    dicom_tls_key: Path | None = Field(None, description="PEM private key of dicom_tls_cert (unless in the certificate's file).")
    dicom_tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: peers connecting to the DICOM listener must present a certificate it signed.",
    )
    uid_root: str = Field("2.25", description="Root for DICOM UIDs we make; 2.25 means UUID-derived UIDs.")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> subject id, for auth mode api-key.")
    listeners: list[str] = Field(
        default_factory=lambda: ["http", "mllp", "dicom"], description="Which doors `clinphoto serve` opens."
    )
    trust_mrn_system: str | None = Field(
        None,
        description="The trust's own hospital number (MRN) system, which `mrn|VALUE` names at every door, e.g. "
        "https://clinphoto.local/Id/mrn/RX1. Unset: the one MRN system the store holds; with MRNs of several trusts "
        "(after a merger) `mrn|...` is then refused as ambiguous.",
    )

    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    dicomweb: DicomwebSettings = Field(default_factory=DicomwebSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    viewer: ViewerSettings = Field(default_factory=ViewerSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value:
            try:
                check_url(value)
            except DatabaseUrlError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("trust_mrn_system")
    @classmethod
    def _check_trust_mrn_system(cls, value: str | None) -> str | None:
        return patient_refs.check_system(value) if value and value.strip() else None  # empty: unset

    @field_validator("uid_root")
    @classmethod
    def _check_uid_root(cls, value: str) -> str:
        parts = value.split(".")
        if not all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts) or len(value) > 40:
            raise ValueError("must be a dotted-number DICOM UID root of at most 40 characters, e.g. 1.2.826.0.1.3680043.10.xxx")
        return value

    @model_validator(mode="after")
    def _tls_files_need_a_certificate(self) -> Settings:
        # asking peers for certificates on a listener that does not speak TLS would check nothing
        if self.dicom_tls_client_ca is not None and self.dicom_tls_cert is None:
            raise ValueError("dicom_tls_client_ca is set but dicom_tls_cert is not (the DICOM listener would not use TLS)")
        if self.dicom_tls_key is not None and self.dicom_tls_cert is None:
            raise ValueError("dicom_tls_key is set but dicom_tls_cert is not")
        if self.http_tls_key is not None and self.http_tls_cert is None:
            raise ValueError("http_tls_key is set but http_tls_cert is not")
        return self

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'clinphoto.db').resolve()}"
        return self


def _setting_name(loc: tuple) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc if not isinstance(part, int)).upper()


# CLINPHOTO_* variables that are not settings but are read elsewhere
_OTHER_VARIABLES = {f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}TEST_POSTGRES_URL"}


def unknown_env_names() -> list[str]:
    """CLINPHOTO_* environment variables that name no setting: usually a typo worth a warning."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = []
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIX) or name in _OTHER_VARIABLES:
            continue
        top = name.split("__", 1)[0]
        if top not in known:
            unknown.append(name)
    return unknown


def load_settings(**overrides) -> Settings:
    """Settings from file and environment; a bad value raises SettingsError with one line naming it."""
    config_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"{ENV_PREFIX}CONFIG: no such file: {config_file}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SettingsError(f"invalid setting {_describe_location(first['loc'], config_file)}: {message}{more}") from None
    except Exception as exc:  # a YAML syntax error, or a nested value in the environment that is not JSON
        text = " ".join(str(exc).split())
        nested = re.search(r'field "(\w+)" from source "EnvSettingsSource"', text)
        if nested:
            names = [n for n in os.environ if n.startswith(f"{ENV_PREFIX}{nested.group(1).upper()}")]
            raise SettingsError(
                f"invalid setting {', '.join(names) or ENV_PREFIX + nested.group(1).upper()}: not valid JSON; "
                f"lists and maps in the environment are JSON, e.g. '[\"10.0.0.0/8\"]'"
            ) from None
        raise SettingsError(f"cannot read settings: {text}") from None


def _describe_location(loc: tuple, config_file: str | None) -> str:
    """The variable's name, or the key in the YAML file when the value came from there."""
    env_name = _setting_name(loc)
    if config_file and env_name not in os.environ and not any(n.startswith(env_name + "__") for n in os.environ):
        key = ".".join(str(part) for part in loc)
        return f"{key} (in {config_file})"
    return env_name
