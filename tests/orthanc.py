"""A real Orthanc (Debian's package) on 127.0.0.1 in a temporary folder, for tests that need an independent PACS."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import require_tool
from tests.net import free_ports

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


class Orthanc:
    """`modalities`: the DICOM peers it knows (e.g. where to send Storage Commitment reports). `dicomweb_servers`: load
    the DICOMweb plugin (its own server at /dicom-web/) and register these DICOMweb servers it may act as a client
    of, by name: {"clinphoto": {"Url": ..., "HttpHeaders": {...}}}."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict[str, dict] | None = None,
                 dicomweb_servers: dict | None = None) -> None:
        self.folder, self.aet = folder, aet
        self.modalities = modalities or {}
        self.dicomweb_servers = dicomweb_servers
        self.http_port, self.dicom_port = free_ports(2)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        tool = require_tool("Orthanc", "orthanc")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs", "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "Plugins": [],
            "HttpCompressionEnabled": False, "DicomModalities": self.modalities,
        }
        if self.dicomweb_servers is not None:
            if not DICOMWEB_PLUGIN.is_file():
                require_tool("orthanc-dicomweb-plugin-missing", "orthanc-dicomweb")
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Servers": self.dicomweb_servers}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        # its own DIMSE sockets would otherwise hold each response ~40 ms (known-to-work.md)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([tool, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def instance_ids(self) -> list[str]:
        return httpx.get(f"{self.url}/instances", timeout=10).json()

    def instances(self) -> list[dict]:
        ids = self.instance_ids()
        return [httpx.get(f"{self.url}/instances/{i}/simplified-tags", timeout=10).json() | {"_id": i} for i in ids]

    def file(self, instance_id: str) -> bytes:
        return httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30).content
