"""The console in a real browser (issue 20): headless Chromium from the OS packages, driven
through the distribution's chromedriver by the W3C WebDriver protocol (plain HTTP: no client
library needed). Load a user page and check its figures against the client, grant credits
through the form and see the new entry, and a hostile user id that stays text. A screenshot of
the page is kept in $CREDICI_TEST_ARTIFACTS (default: test-artifacts/). Under CI=true a missing
Chromium fails the run (`./run test` installs it); elsewhere the test is skipped."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.console import create_app
from tests.conftest import REDIS_URL, free_port
from tests.web.conftest import serve_asgi

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
ARTIFACTS = Path(os.environ.get("CREDICI_TEST_ARTIFACTS", "test-artifacts"))

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI") == "true":
        raise RuntimeError(
            "CI=true: Chromium and chromedriver are needed (./run test installs them)"
        )
    pytest.skip("Chromium or chromedriver is not installed", allow_module_level=True)


class Browser:
    """One WebDriver session: the few commands these tests use."""

    def __init__(self, http: httpx.Client, session: str) -> None:
        self.http, self.base = http, f"/session/{session}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        reply = self.http.request(method, self.base + path, json=body)
        value = reply.json()["value"]
        if reply.status_code != 200:
            raise AssertionError(f"webdriver {path}: {value}")
        return value

    def go(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return str(self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT])

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [str(e[ELEMENT]) for e in found]

    def text(self, element: str) -> str:
        return str(self._call("GET", f"/element/{element}/text"))

    def attribute(self, element: str, name: str) -> str:
        return str(self._call("GET", f"/element/{element}/attribute/{name}"))

    def type(self, element: str, text: str) -> None:
        self._call("POST", f"/element/{element}/value", {"text": text})

    def click(self, element: str) -> None:
        self._call("POST", f"/element/{element}/click", {})

    def execute(self, script: str) -> Any:
        """Run `script` (a function body) in the page; its return value."""
        return self._call("POST", "/execute/sync", {"script": script, "args": []})

    def has_alert(self) -> bool:
        reply = self.http.get(self.base + "/alert/text")
        return reply.status_code == 200

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))

    def wait_for(self, css: str, seconds: float = 10) -> str:
        deadline = time.monotonic() + seconds
        while True:
            found = self.find_all(css)
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"{css} never appeared"
            time.sleep(0.05)


@contextmanager
def browser() -> Iterator[Browser]:
    assert CHROMIUM and CHROMEDRIVER
    port = free_port()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if http.get("/status").json()["value"]["ready"]:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.05)
            options = {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1100,1400"],
            }  # fmt: skip
            capabilities = {"browserName": "chrome", "goog:chromeOptions": options}
            reply = http.post("/session", json={"capabilities": {"alwaysMatch": capabilities}})
            session = reply.json()["value"]["sessionId"]
            try:
                yield Browser(http, session)
            finally:
                http.delete(f"/session/{session}")
    finally:
        driver.terminate()
        driver.wait(10)


@contextmanager
def served(namespace: str) -> Iterator[str]:
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)
    app = create_app(client, close_client=True, authorize=lambda request: "browser-test")
    with serve_asgi(app) as base:
        yield base


def test_a_user_page_in_chromium_and_a_grant_through_its_form(namespace: str, user: str) -> None:
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as ledger:
        ledger.add(user, 120, metadata={"plan": "pro"})
        ledger.subtract(user, 20)
        ledger.set_credit_limit(user, 10)
        with served(namespace) as base, browser() as page:
            page.go(f"{base}/users/{quote(user, safe='')}")
            details = ledger.get_balance_details(user)
            assert page.text(page.find("#balance")) == str(details.balance) == "100"
            assert page.text(page.find("#available")) == str(details.available) == "110"
            assert page.text(page.find("#credit-limit")) == "10"
            rows = page.find_all("#history tr[data-tx]")
            assert [page.attribute(r, "data-tx") for r in rows] == [
                t.transaction_id for t in ledger.get_all_user_transactions(user)
            ]
            page.type(page.find("#grant-amount"), "35")
            page.type(page.find("#grant-reason"), "refund for outage")
            page.click(page.find("#grant-button"))
            notice = page.wait_for("#notice")
            assert page.text(notice) == "granted 35: balance 135"
            assert page.text(page.find("#balance")) == "135"
            newest = page.find_all("#history tr[data-tx]")[0]
            assert "reason=refund for outage" in page.text(newest)
            assert "operator=browser-test" in page.text(newest)
            page.screenshot(ARTIFACTS / "console-user-page.png")
        assert ledger.get_balance(user) == 135
        tx = ledger.get_all_user_transactions(user)[0]
        assert tx.metadata == {"reason": "refund for outage", "operator": "browser-test"}


def test_a_hostile_user_id_is_shown_as_text_in_chromium(namespace: str) -> None:
    user = '<script>alert("pwned")</script>'
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as ledger:
        ledger.add(user, 5, metadata={"note": "<img src=x onerror=alert(2)>"})
        with served(namespace) as base, browser() as page:
            page.go(f"{base}/users/{quote(user, safe='')}")
            assert page.text(page.find("#user-id")) == user  # shown, not run
            assert not page.has_alert()
            assert "<img src=x onerror=alert(2)>" in page.text(page.find("#history"))
            assert page.find_all("#history img") == []
