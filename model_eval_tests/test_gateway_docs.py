"""The gateway's /docs: Swagger UI served from the gateway itself (no CDN, so it renders offline), behind
the read token, and describing the chat endpoint that the lean route serves ahead of FastAPI. Real
uvicorn over real HTTP; the browser test uses headless Chromium (scripts/chromium_for_tests.sh; it
skips without it, or fails when MODEL_EVAL_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import re

import pytest
from swagger_ui_bundle import swagger_ui_path

from model_eval.gateway.security import Access
from model_eval_tests.browser import artifact, chromium, console_errors
from model_eval_tests.fake_openai_server import FakeOpenAIServer
from model_eval_tests.gateway_harness import READ_TOKEN, WRITE_TOKEN, ThreadedGateway, http, make_project, publish

ROUTES = ["/v1/chat/completions", "/v1/feedback", "/v1/health", "/v1/tasks", "/v1/tasks/{task}",
          "/v1/tasks/{task}/leaderboard", "/v1/models/{name}/stats"]


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_EVAL_API_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("MODEL_EVAL_API_READ_TOKEN", READ_TOKEN)
    with FakeOpenAIServer() as fake:
        paths = make_project(tmp_path / "p", fake.api_base)
        publish(paths, {"grading": {"model": "steady"}})
        with ThreadedGateway(paths, Access.from_env()) as gw:
            yield gw


def _references(page: str) -> list[str]:
    """Every address the page loads or links: src/href attributes, and Swagger UI's url/validatorUrl."""
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page) + re.findall(r"""\burl:\s*'([^']*)'""", page)


def test_docs_load_nothing_from_outside_and_serve_their_assets_behind_the_read_token(served):
    page = http("GET", served.base_url + "/docs", token=READ_TOKEN)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    references = [r for r in _references(html) if r]
    assert sorted(references) == ["/docs/favicon-32x32.png", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"]
    assert not re.search(r"https?://|//[a-z]", " ".join(references))
    assert '"validatorUrl": null' in html   # else Swagger UI may fetch a badge from its public validator
    for reference, media_type in [("/docs/swagger-ui-bundle.js", "text/javascript"), ("/docs/swagger-ui.css", "text/css"),
                                  ("/docs/favicon-32x32.png", "image/png")]:
        assert http("GET", served.base_url + reference).status == 401   # no token: refused like every read
        asset = http("GET", served.base_url + reference, token=READ_TOKEN)
        assert asset.status == 200 and asset.headers["content-type"].startswith(media_type), reference
        assert asset.body == (swagger_ui_path / reference.rsplit("/", 1)[1]).read_bytes()
    # Only the files the page needs: nothing else from the package, and no path reaches the disk.
    for other in ("/docs/index.html", "/docs/swagger-ui-bundle.js.map", "/docs/__init__.py"):
        reply = http("GET", served.base_url + other, token=READ_TOKEN)
        assert reply.status == 404 and reply.json()["error"]["param"] == "asset", other
    assert http("GET", served.base_url + "/docs/..%2F__init__.py", token=READ_TOKEN).status == 404


def test_the_openapi_document_describes_the_chat_endpoint_the_lean_route_serves(served):
    document = http("GET", served.base_url + "/openapi.json", token=READ_TOKEN).json()
    assert set(ROUTES) <= set(document["paths"])
    chat = document["paths"]["/v1/chat/completions"]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["model", "messages"] and "stream" in schema["properties"]
    assert chat["security"] == [{"HTTPBearer": []}]   # the Authorize button applies to it


def test_swagger_ui_renders_the_endpoint_list_in_a_real_browser(served):
    with chromium(1400, 1000) as driver:
        # A browser sends no bearer token by itself; DevTools adds the header to every request of the page.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {READ_TOKEN}"}})
        driver.get(served.base_url + "/docs")
        from selenium.webdriver.support.ui import WebDriverWait

        listed = "return [...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path || e.innerText)"
        paths = WebDriverWait(driver, 60, poll_frequency=0.25).until(
            lambda d: d.execute_script(listed) or None, message="Swagger UI's endpoint list")
        driver.save_screenshot(str(artifact("gateway-docs.png")))
        assert sorted(p.replace("\u200b", "") for p in paths) == sorted(ROUTES)
        methods = driver.execute_script("return [...document.querySelectorAll('.opblock-summary-method')].map(e => e.innerText)")
        assert methods.count("POST") == 2 and methods.count("GET") == 5
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(served.base_url + "/docs/") for url in loaded), loaded
        assert console_errors(driver) == []
