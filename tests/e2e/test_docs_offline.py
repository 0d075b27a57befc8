"""/docs and /redoc work offline: every script, style and icon they load is served by the server
itself, and (where Chromium is installed) a headless browser renders the API's operations."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

PAGES = {"/docs": "swagger-ui", "/redoc": "redoc"}


def assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html)


@pytest.mark.parametrize("page", PAGES)
def test_every_asset_is_served_locally(server, page):
    r = httpx.get(f"{server.url}{page}")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = [u for u in assets(r.text) if not u.startswith("#")]
    assert urls, "the page loads its scripts"
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from elsewhere"
        got = httpx.get(f"{server.url}{url}")
        assert got.status_code == 200 and len(got.content) > 100, url
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts and all(len(httpx.get(f"{server.url}{u}").content) > 100_000 for u in scripts)
    assert "cdn.jsdelivr.net" not in r.text and "fonts.googleapis.com" not in r.text


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (apt install chromium)")
@pytest.mark.parametrize("page", PAGES)
def test_a_headless_browser_renders_the_operations(server, page):
    run = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=15000", "--dump-dom", f"{server.url}{page}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dom = run.stdout
    assert PAGES[page] in dom, run.stderr[-2000:]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        assert path in dom, f"{page} did not render {path}"
