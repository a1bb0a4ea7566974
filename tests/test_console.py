"""The operator console (issue 20), over HTTP: the figures of a user page against the client's,
escaping of hostile user ids and metadata, actions through forms (a reason kept in the entry,
the operator's name from `authorize`, a double submit applied once), read-only and refusals.
Real Redis; the browser test is tests/test_console_browser.py."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.console import create_app
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.web.conftest import serve_asgi


@pytest.fixture
def ledger(namespace: str) -> Iterator[CrediciClient]:
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        yield client


@contextlib.contextmanager
def console(
    namespace: str, archive_url: str | None = None, **options: Any
) -> Iterator[httpx.Client]:
    """The console served by uvicorn (in a thread), and an HTTP client of it."""
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace, archive_url=archive_url)
    app = create_app(client, close_client=True, **options)
    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        yield http


def figure(page: str, name: str) -> int:
    found = re.search(rf'id="{name}">(-?\d+)<', page)
    assert found, name
    return int(found.group(1))


def form_of(page: str, form_id: str) -> dict[str, str]:
    """The hidden fields (key, token) of one form of the page."""
    start = page.index(f'id="{form_id}"')
    chunk = page[start : page.index("</form>", start)]
    return dict(re.findall(r'name="(key|token)" value="([^"]+)"', chunk))


def test_the_user_page_shows_the_clients_figures(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    soon = datetime.now(timezone.utc) + timedelta(days=3)
    ledger.add(user, 100, soon)
    ledger.add(user, 50)
    ledger.set_credit_limit(user, 20)
    ledger.subtract(user, 30, metadata={"endpoint": "/v1/chat"})
    hold = ledger.reserve(user, 5)
    with console(namespace) as http:
        page = http.get(f"/users/{quote(user)}").text
    details = ledger.get_balance_details(user)
    assert figure(page, "balance") == details.balance == 115
    assert figure(page, "available") == details.available == 135
    assert figure(page, "held") == details.held == 5
    assert figure(page, "credit-limit") == 20
    assert soon.strftime("%Y-%m-%d %H:%M:%S UTC") in page  # the bucket's expiry
    timeline = page[page.index('id="timeline"') : page.index("</svg>", page.index('id="timeline"'))]
    dated = [b for b in details.buckets if b.expire_at is not None]
    assert re.findall(r"<title>(\d+) credits expire", timeline) == [str(b.amount) for b in dated]
    assert "and 50 credits that never expire" in page
    assert "endpoint=/v1/chat" in page
    assert hold.hold_id in page  # an active hold, with its release form
    rows = re.findall(r'data-tx="([^"]+)"', page)
    assert rows == [t.transaction_id for t in ledger.get_all_user_transactions(user)]


def test_a_pools_page_shows_the_caps_of_the_members_it_names(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    from credici_redis import Budget

    ledger.add(user, 100)
    ledger.set_member_cap(user, "alice", Budget(30, "day"))
    ledger.subtract(user, 7, member="alice")
    ledger.subtract(user, 2, member="<b>bob</b>")  # no cap: not counted, not shown
    with console(namespace) as http:
        page = http.get(f"/users/{quote(user)}").text
    table = page[page.index('id="members"') : page.index("</table>", page.index('id="members"'))]
    usage = ledger.get_member_usage(user, "alice")
    assert '<td>alice</td><td class="n">7</td><td>30 per day</td>' in table
    assert f"{usage.resets_at:%Y-%m-%d %H:%M} UTC" in table
    assert "bob" not in table and "member=&lt;b&gt;bob&lt;/b&gt;" in page


def test_every_active_hold_is_listed_not_only_those_of_the_page(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    ledger.add(user, 1000)
    old = ledger.reserve(user, 9)
    ledger.subtract_many([(user, 1)] * 60)  # the reserve entry is past the first page of 50
    with console(namespace) as http:
        page = http.get(f"/users/{quote(user)}").text
    assert old.transaction_id not in re.findall(r'data-tx="([^"]+)"', page)
    holds = page[page.index('id="holds"') : page.index("</table>", page.index('id="holds"'))]
    assert old.hold_id in holds and '<td class="n">9</td>' in holds


def test_hostile_user_ids_and_metadata_stay_text(ledger: CrediciClient, namespace: str) -> None:
    user = "<script>alert('u')</script>"
    ledger.add(user, 10, metadata={"note": "<img src=x onerror=alert(1)>"})
    with console(namespace) as http:
        page = http.get(f"/users/{quote(user, safe='')}").text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;u&#39;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert figure(page, "balance") == 10


def test_a_grant_through_the_form_applies_once_and_keeps_its_reason(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    ledger.add(user, 1)
    name = "ops-anna"
    with console(namespace, authorize=lambda request: name) as http:
        page = http.get(f"/users/{quote(user)}").text
        hidden = form_of(page, "grant-form")
        body = {**hidden, "amount": "25", "reason": "goodwill, ticket 4411"}
        first = http.post(f"/users/{quote(user)}/grant", data=body)
        second = http.post(f"/users/{quote(user)}/grant", data=body)  # a double click
        assert first.status_code == second.status_code == 303
        after = http.get(first.headers["location"]).text
    assert ledger.get_balance(user) == 26
    newest = ledger.get_all_user_transactions(user)[0]
    assert (newest.kind, newest.amount) == ("add", 25)
    assert newest.metadata == {"reason": "goodwill, ticket 4411", "operator": name}
    assert "granted 25: balance 26" in after
    assert figure(after, "balance") == 26


def test_actions_need_a_reason_and_a_form_of_the_console(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    ledger.add(user, 10)
    with console(namespace) as http:
        hidden = form_of(http.get(f"/users/{quote(user)}").text, "charge-form")
        no_reason = http.post(f"/users/{quote(user)}/charge", data={**hidden, "amount": "3"})
        forged = http.post(
            f"/users/{quote(user)}/charge",
            data={"key": "k", "token": "0" * 64, "amount": "3", "reason": "x"},
        )
        too_much = http.post(
            f"/users/{quote(user)}/charge", data={**hidden, "amount": "11", "reason": "r"}
        )
    assert no_reason.status_code == 400 and forged.status_code == 403
    assert too_much.status_code == 400 and "InsufficientCreditsError" in too_much.text
    assert ledger.get_balance(user) == 10


def test_read_only_shows_no_forms_and_refuses_posts(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    ledger.add(user, 10)
    with console(namespace, read_only=True) as http:
        page = http.get(f"/users/{quote(user)}").text
        refused = http.post(f"/users/{quote(user)}/grant", data={"amount": "5", "reason": "r"})
    assert '<form method="post"' not in page
    assert refused.status_code == 403
    assert ledger.get_balance(user) == 10


def test_authorize_refusing_is_a_403(namespace: str, user: str) -> None:
    with console(namespace, authorize=lambda request: None) as http:
        assert http.get(f"/users/{quote(user)}").status_code == 403
        assert http.get("/").status_code == 403


def test_search_by_transaction_id_opens_its_users_page(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    tx = ledger.add(user, 7)
    with console(namespace) as http:
        found = http.get("/search", params={"q": tx.transaction_id})
        assert found.status_code == 303
        page = http.get(found.headers["location"]).text
        by_user = http.get("/search", params={"q": user})
    assert f'class="hl" data-tx="{tx.transaction_id}"' in page
    assert by_user.headers["location"] == f"/users/{quote(user, safe='')}"


def test_history_pages_and_filters(ledger: CrediciClient, namespace: str, user: str) -> None:
    ledger.add_many([(user, 1)] * 60)
    ledger.subtract(user, 2)
    with console(namespace) as http:
        first = http.get(f"/users/{quote(user)}").text
        older = re.search(r'id="older" href="([^"]+)"', first)
        assert older
        second = http.get(f"/users/{quote(user)}" + older.group(1).replace("&amp;", "&")).text
        charges = http.get(f"/users/{quote(user)}", params={"kind": "subtract"}).text
    ids = [t.transaction_id for t in ledger.get_all_user_transactions(user)]
    assert re.findall(r'data-tx="([^"]+)"', first) == ids[:50]
    assert re.findall(r'data-tx="([^"]+)"', second) == ids[50:]
    assert re.findall(r'data-tx="([^"]+)"', charges) == ids[:1]


def test_reverse_and_credit_limit_through_their_forms(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    ledger.add(user, 50)
    charge = ledger.subtract(user, 20)
    with console(namespace) as http:
        page = http.get(f"/users/{quote(user)}").text
        row = page[page.index(f'data-tx="{charge.transaction_id}"') :]
        row = row[: row.index("</form>")]
        hidden = dict(re.findall(r'name="(key|token|transaction_id)" value="([^"]+)"', row))
        assert hidden["transaction_id"] == charge.transaction_id
        done = http.post(f"/users/{quote(user)}/reverse", data={**hidden, "reason": "disputed"})
        again = http.post(f"/users/{quote(user)}/reverse", data={**hidden, "reason": "disputed"})
        assert done.status_code == again.status_code == 303  # the same key: applied once
        start = page.index('action="/users/' + quote(user, safe="") + '/credit-limit"')
        limit_form = page[start : page.index("</form>", start)]
        limit_hidden = dict(re.findall(r'name="(key|token)" value="([^"]+)"', limit_form))
        http.post(
            f"/users/{quote(user)}/credit-limit",
            data={**limit_hidden, "limit": "15", "reason": "trusted customer"},
        )
    assert ledger.get_balance(user) == 50
    history = ledger.get_all_user_transactions(user)
    assert [t.kind for t in history] == ["credit_limit", "reverse", "subtract", "add"]
    assert ledger.get_balance_details(user).credit_limit == 15 == history[0].credit_limit
    assert history[0].metadata == {"reason": "trusted customer", "operator": "console"}
    assert history[1].metadata == {"reason": "disputed", "operator": "console"}


def test_mounted_under_a_prefix_its_links_and_redirects_keep_it(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    ledger.add(user, 5)
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()  # a mounted app's own lifespan does not run: the service's does

    app = Starlette(routes=[Mount("/credits", app=create_app(client))], lifespan=lifespan)
    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        page = http.get(f"/credits/users/{quote(user)}").text
        assert 'action="/credits/search"' in page
        assert f'action="/credits/users/{quote(user, safe="")}/grant"' in page
        hidden = form_of(page, "grant-form")
        done = http.post(
            f"/credits/users/{quote(user)}/grant", data={**hidden, "amount": "2", "reason": "r"}
        )
        assert done.headers["location"].startswith(f"/credits/users/{quote(user, safe='')}?")
        assert http.get("/credits/search", params={"q": user}).headers["location"] == (
            f"/credits/users/{quote(user, safe='')}"
        )
    assert ledger.get_balance(user) == 7


def test_the_overview_shows_users_archive_lag_and_recent_events(
    ledger: CrediciClient, namespace: str, user: str
) -> None:
    import time

    hostile = f"<script>alert(1)</script>{user}"
    for who in (user, hostile, f"{user}-quiet"):
        ledger.add(who, 10)
    for who in (user, hostile):
        ledger.set_low_balance_threshold(who, 5)
        time.sleep(0.002)  # two ms apart: the newest first
        ledger.subtract(who, 6)
    waiting = sum(
        len(ledger.get_all_user_transactions(u)) for u in (user, hostile, f"{user}-quiet")
    )
    with console(namespace, archive_url=POSTGRES_URL) as http:
        page = http.get("/").text
    assert re.search(r'id="users">3<', page)
    assert re.search(r'id="archive-users">3<', page)  # nothing was archived yet
    assert re.search(rf'id="archive-entries">{waiting}<', page)
    assert re.search(r'id="archive-lag">\d+\.\d s<', page)
    events = page[page.index('id="events"') :]
    assert events.index(quote(hostile)) < events.index(f"/users/{user}?")  # newest first
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    with console(namespace) as http:  # no archive given: no lag shown, the events are
        page = http.get("/").text
    assert 'id="archive-lag"' not in page and "--archive-url" in page
    assert page.count("low_balance") == 2


def test_the_console_command_serves_it(ledger: CrediciClient, namespace: str, user: str) -> None:
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    ledger.add(user, 3)
    port = free_port()
    command = [sys.executable, "-m", "credici_redis", "console", "--redis-url", REDIS_URL,
               "--namespace", namespace, "--port", str(port), "--read-only",
               "--archive-url", POSTGRES_URL]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/users/{quote(user)}", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "did not start"
                time.sleep(0.1)
        assert page.status_code == 200 and figure(page.text, "balance") == 3
        assert "read-only" in page.text and '<form method="post"' not in page.text
        overview = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
        assert 'id="archive-users">1<' in overview  # the archive it was given
    finally:
        server.terminate()
        server.wait(10)
