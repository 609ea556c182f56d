"""The OHIF Viewer 3.13.2 (npm @ohif/app, its prebuilt dist/, installed by `npm ci` from package-lock.json) in
headless Chromium, with clinphoto's /dicomweb as its data source: the study list shows the patient's studies through
QIDO-RS, the viewer opens one through WADO-RS (metadata, thumbnail, frames), every request it makes to clinphoto
succeeds, and a screenshot of the photo in the viewport is kept in artifacts/screenshots/.

The viewer and the door are served from one origin on 127.0.0.1 (as a hospital would put them behind one host);
the browser sends the bearer token on its requests. Both backends."""

from __future__ import annotations

import io
import mimetypes
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.responses import FileResponse, Response

from gateway.app import create_app
from tests.auth_helpers import token_for
from tests.browser import chromium
from tests.conftest import IN_CI
from tests.test_dicom_find import archive  # noqa: F401 (the fixture)
from tests.test_photos_api import serving

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "node_modules" / "@ohif" / "app" / "dist"
# WebGL without a GPU: Chromium's software rasteriser (known-to-work.md)
WEBGL_FLAGS = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")
mimetypes.add_type("application/wasm", ".wasm")


def ohif_dist() -> Path:
    if not (DIST / "index.html").is_file():
        message = "the OHIF Viewer is not installed: make node_modules/.installed (npm ci from package-lock.json)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return DIST


def app_config(origin: str) -> str:
    """The package's own app-config.js with its data source pointed at clinphoto (QIDO-RS and WADO-RS, not static)."""
    text = (DIST / "app-config.js").read_text()
    for key in ("wadoUriRoot", "qidoRoot", "wadoRoot"):
        text, n = re.subn(rf"{key}: '[^']*'", f"{key}: '{origin}/dicomweb'", text)
        assert n == 1, key
    text, n = re.subn(r"staticWado: true", "staticWado: false", text)
    assert n == 1
    return text


def site(gw, dist: Path, config: dict[str, str]):
    """One origin: /dicomweb is clinphoto's app, everything else the viewer (unknown paths answered by index.html,
    as the viewer routes /viewer?StudyInstanceUIDs=... itself)."""
    gateway = create_app(gw)

    async def app(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith("/dicomweb"):
            await gateway(scope, receive, send)
            return
        if path == "/app-config.js":
            response: Response = Response(config["js"], media_type="text/javascript")
        else:
            file = (dist / path.lstrip("/")).resolve()
            inside = dist.resolve() in file.parents and file.is_file()
            response = FileResponse(file if inside else dist / "index.html")
        await response(scope, receive, send)

    return app


def test_ohif_viewer_lists_and_opens_a_study_from_clinphoto(gw, archive, tmp_path):  # noqa: F811
    dist = ohif_dist()
    config: dict[str, str] = {}
    token = token_for(gw, role="medical-illustration", sub="ohif.viewer")
    with serving(site(gw, dist, config)) as web:
        origin = str(web.base_url).rstrip("/")
        config["js"] = app_config(origin)
        with chromium(viewport=(1400, 900), extra_args=WEBGL_FLAGS) as page:
            p = page.page
            p.context.set_extra_http_headers({"Authorization": f"Bearer {token}"})
            answers: list[tuple[str, int]] = []
            p.on("response", lambda r: answers.append((r.url, r.status)) if "/dicomweb/" in r.url else None)
            # the study list: the patient's two studies found through QIDO-RS
            console: list[str] = []  # the viewer's own log, shown if the list stays empty
            p.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            p.goto(f"{origin}/", wait_until="domcontentloaded")
            p.get_by_text("Jones, Ann").first.wait_for(timeout=60_000)
            assert p.get_by_text("Ó Súilleabháin, Siobhán").count() == 2, "\n".join(console[-20:])
            page.screenshot("ohif-study-list")
            # the viewer: metadata, thumbnail and the frame through WADO-RS, drawn in the viewport
            p.goto(f"{origin}/viewer?StudyInstanceUIDs=1.2.826.0.1.1", wait_until="domcontentloaded")
            p.wait_for_function("() => [...document.querySelectorAll('canvas')].some(c => c.width > 200 && c.height > 200)",
                                timeout=60_000)
            p.wait_for_timeout(1_000)
            frame_loaded = [u for u, s in answers if "/frames/1" in u and s == 200]
            deadline = 60
            while not frame_loaded and deadline:
                p.wait_for_timeout(1_000)
                deadline -= 1
                frame_loaded = [u for u, s in answers if "/frames/1" in u and s == 200]
            p.wait_for_timeout(2_000)
            shot = page.screenshot("ohif-viewer")
    failed = [(u, s) for u, s in answers if s >= 400]
    assert not failed, failed
    paths = {re.sub(r"\?.*", "", u.split("/dicomweb", 1)[1]) for u, _ in answers}
    assert "/studies" in paths and any(x.endswith("/metadata") for x in paths) and frame_loaded, sorted(paths)
    # the photo is in the viewport: a viewer with nothing drawn is a flat dark area
    image = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    height, width, _ = image.shape
    middle = image[height // 4: 3 * height // 4, width // 4: 3 * width // 4]
    assert len(np.unique(middle.reshape(-1, 3), axis=0)) > 200, "nothing drawn in the viewport"
