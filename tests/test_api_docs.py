"""API documentation that works on a hospital network: served by the gateway itself, describing every answer."""

from __future__ import annotations

from tests.browser import chromium
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)


def test_openapi_describes_headers_refusals_and_schemas(gw, api):  # noqa: F811
    spec = api.get("/api/openapi.json").json()
    paths = spec["paths"]
    listing = paths["/api/v1/photos"]["get"]
    headers = {p["name"] for p in listing["parameters"] if p["in"] == "header"}
    assert {"X-Purpose-Of-Use", "X-Break-Glass"} <= headers
    for path, methods in paths.items():
        if not path.startswith("/api/v1/"):
            continue  # /healthz and /readyz are open
        for method, op in methods.items():
            codes = set(op["responses"])
            assert "401" in codes, (method, path)  # every route needs a token
            assert any(c.startswith("2") for c in codes), (method, path)
    assert {"400", "401", "403", "404"} <= set(paths["/api/v1/photos/{photo_id}"]["get"]["responses"])
    assert {"409"} <= set(paths["/api/v1/consents/{consent_id}/withdraw"]["post"]["responses"])
    assert {"413", "415", "422"} <= set(paths["/api/v1/photos"]["post"]["responses"])
    ok = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/PhotoPage")
    photo = spec["components"]["schemas"]["PhotoOut"]["properties"]
    assert {"sopInstanceUid", "bodySite", "consent", "patient"} <= set(photo)
    refused = paths["/api/v1/photos/{photo_id}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"]
    assert refused["$ref"].endswith("/Problem")
    upload_refused = paths["/api/v1/photos"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert upload_refused["$ref"].endswith("/UploadProblem")
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["bearerFormat"] == "JWT"


def test_docs_render_in_a_browser_with_no_request_off_the_host(gw, api):  # noqa: F811
    base = str(api.base_url).rstrip("/")
    operations = sum(len(m) for m in api.get("/api/openapi.json").json()["paths"].values())
    with chromium() as browser:
        page = browser.page
        page.goto(f"{base}/api/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        assert page.locator(".opblock").count() == operations
        assert page.locator("text=Upload photos").count() >= 1
        browser.screenshot("api-docs-swagger")
        page.goto(f"{base}/api/redoc")
        page.wait_for_selector("[data-section-id]", timeout=30_000)
        assert page.locator("text=Read a patient").count() >= 1
        browser.screenshot("api-docs-redoc")
        assert browser.requests and not browser.off_host(), browser.off_host()
