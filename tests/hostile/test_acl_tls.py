"""The library under a least-privilege Redis ACL user, and over TLS (docs/security.md).

The tests start `redis-server`s of their own (module-scoped, on free ports, no persistence) whose
`default` user has a password, and create the ACL users whose `ACL SETUSER` lines are in
docs/security.md, read from that file so that the documentation cannot drift from what is tested.

- As `credici`, a workload touching every operation works with every client API, and without any
  single one of its grants it fails: the ACL is both sufficient and minimal.
- The ACL is real: other keys, other commands and self-loaded scripts reaching outside the
  namespace are refused, and only `credici-ops` may SCAN.
- The contract suite passes when its Redis user is `credici-tests` (a pytest subprocess).
- `rediss://`: a throwaway CA and certificates from `openssl`; server verification, host names,
  and client certificates. Skipped only when this redis-server was built without TLS (it refuses
  the TLS options); a missing openssl or redis-server fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from credici_redis import AsyncCrediciClient, CrediciClient, StorageError
from credici_redis._core import keys as _keys
from credici_redis.errors import EvictionPolicyError, StorageUnavailableError
from tests.conftest import FakeClock, SyncAsAsync, free_port
from tests.hostile.test_hostile_input import look

ROOT = Path(__file__).absolute().parents[2]  # not resolve(): the tree the test runs in
DOCS = ROOT / "docs" / "security.md"
ADMIN_PASSWORD = "admin-secret"
PASSWORD = "credici-secret"
NAMESPACE = "credici"  # the default namespace of from_url: what the docs' first line is for
OTHER = "other"
# How Redis words a refusal by the ACL: of a command, or of a command inside a script.
REFUSED = re.compile(r"NOPERM|no permissions|user executing the script can't", re.IGNORECASE)


def acl_rules(user: str, namespace: str = NAMESPACE) -> list[str]:
    """The rules of `ACL SETUSER <user> ...` in docs/security.md, placeholders filled in."""
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"ACL SETUSER {user} "):
            fill = {"<password>": PASSWORD, "<namespace>": namespace}
            rules = shlex.split(line)[3:]
            for placeholder, value in fill.items():
                rules = [rule.replace(placeholder, value) for rule in rules]
            return rules
    raise AssertionError(f"docs/security.md has no `ACL SETUSER {user} ...` line")


def grants(rules: list[str]) -> set[str]:
    return {rule for rule in rules if rule.startswith("+")}


def test_the_documented_users_differ_only_where_the_docs_say() -> None:
    worker, ops, tests = acl_rules("credici"), acl_rules("credici-ops"), acl_rules("credici-tests")
    assert worker[:2] == ["reset", "on"] and f"~{NAMESPACE}:*" in worker
    # reading events; trimming those every group acknowledged (optional: "+xinfo|groups" ...)
    events = {"+xgroup|create", "+xreadgroup", "+xautoclaim", "+xack", "+xinfo|groups", "+xpending"}
    assert grants(ops) - grants(worker) == {"+scan", "+xtrim"} | events  # + trim_history
    tests_only = {"+scan", "+ping", "+unlink", "+hkeys", "+xtrim", "+xdel"}
    assert grants(tests) - grants(worker) == tests_only | events
    assert not grants(worker) - grants(ops) and not grants(worker) - grants(tests)
    assert [r for r in worker + ops + tests if r.startswith(("~", "%", "&", "allkeys", "+@"))] == [
        f"~{NAMESPACE}:*",
        f"~{NAMESPACE}:*",
        "~t*",
    ]


# --- a redis-server of our own ---------------------------------------------------------------


class ServerDidNotStart(RuntimeError):
    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


def start_redis(
    directory: Path, args: list[str], ping: Callable[[], object]
) -> subprocess.Popen[bytes]:
    """redis-server with `args`, no persistence, logging to `directory`; waits for `ping`."""
    log = directory / "redis.log"
    fixed = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    proc = subprocess.Popen(
        ["redis-server", *fixed, "--logfile", str(log), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert proc.stderr is not None
            errors = proc.stderr.read().decode(errors="replace")
            logged = log.read_text(errors="replace") if log.exists() else ""
            raise ServerDidNotStart(errors + logged, exited=True)
        try:
            ping()
            return proc
        except redis.RedisError:
            time.sleep(0.05)
    stop(proc)
    raise ServerDidNotStart(f"redis-server {args} did not answer within 10 s", exited=False)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@dataclass
class Server:
    port: int
    admin: redis.Redis

    def url(self, user: str, scheme: str = "redis") -> str:
        return f"{scheme}://{user}:{PASSWORD}@127.0.0.1:{self.port}/0"

    def set_user(self, name: str, rules: list[str]) -> None:
        self.admin.execute_command("ACL", "SETUSER", name, *rules)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("acl")
    port = free_port()
    admin = redis.Redis(port=port, password=ADMIN_PASSWORD, socket_timeout=10)
    proc = start_redis(
        directory, ["--port", str(port), "--requirepass", ADMIN_PASSWORD], admin.ping
    )
    server = Server(port, admin)
    try:
        for user in ("credici", "credici-ops", "credici-tests"):
            server.set_user(user, acl_rules(user))
        yield server
    finally:
        admin.close()
        stop(proc)


def make_client(api: str, url: str, **options: Any) -> Any:
    if api == "sync":
        return SyncAsAsync(CrediciClient.from_url(url, **options))
    if api == "async-batched":
        options = {"batching": True, **options}
    return AsyncCrediciClient.from_url(url, **options)


async def close(client: Any) -> None:
    if isinstance(client, SyncAsAsync):
        client.sync.close()
    else:
        await client.aclose()


# --- the workload ----------------------------------------------------------------------------


async def workload(
    clocked: Any, realtime: Any, clock: FakeClock, admin: redis.Redis, tag: str
) -> None:
    """Every operation, so that every documented grant is used at least once.

    `clocked` runs on the injected clock (expiry and renewal without waiting), `realtime` on the
    server's TIME. The scripts are flushed first and halfway, so SCRIPT LOAD is always needed.
    """
    admin.script_flush()
    user, other = f"{tag}-u", f"{tag}-r"
    t0 = clock.now
    first = await clocked.add(user, 10, idempotency_key="a", metadata={"k": "v"})  # SET
    assert await clocked.add(user, 10, idempotency_key="a", metadata={"k": "v"}) == first  # GET
    await clocked.add(user, 5, ttl=timedelta(seconds=10))
    spent = await clocked.subtract(user, 12, idempotency_key="s")  # drains the 5 (HDEL, ZREM)
    assert spent.balance_after == 3
    await clocked.add(user, 4, ttl=timedelta(seconds=1))
    clock.advance(timedelta(seconds=2))
    assert await clocked.get_balance(user) == 3  # the 4 expired (ZRANGE, HGET, ...)
    cycle = await clocked.start_cycle(100, "month", user, renew=True, tz="Europe/Berlin")
    assert (await clocked.get_cycle(user)) == cycle
    clock.advance(timedelta(days=32))  # one renewal
    assert await clocked.get_balance(user) == 103
    canceled = await clocked.cancel_cycle(user, forfeit=True)
    assert canceled.status == "canceled"
    history = await clocked.get_all_user_transactions(user)
    assert [(t.kind, t.amount) for t in history] == [
        ("expire", -100),  # forfeited
        ("cycle_start", 100),  # the renewal
        ("expire", -100),  # the first grant, at its end (rollover 0)
        ("cycle_start", 100),
        ("expire", -4),
        ("add", 4),
        ("subtract", -12),
        ("add", 5),
        ("add", 10),
    ]
    window = await clocked.get_user_transactions_for_period(
        user, t0 + timedelta(milliseconds=500), t0 + timedelta(milliseconds=1500)
    )
    assert [(t.kind, t.amount) for t in window] == [("expire", -4)]  # dated at its expiry

    # Holds, reverse, overdraft: credits coming back go into their bucket (HEXISTS).
    hold = await clocked.reserve(user, 2)  # from the 10-credit bucket, which keeps 1
    assert await clocked.get_balance(user) == 1
    captured = await clocked.capture(hold.hold_id, 1)  # 1 charged, 1 back into that bucket
    assert (captured.captured, captured.amount, captured.balance_after) == (1, 1, 2)
    drained = await clocked.reserve(user, 2)  # empties the bucket: it is dropped
    assert (await clocked.release(drained.hold_id)).status == "released"  # and made anew
    charge = await clocked.subtract(user, 1)
    reversal = await clocked.reverse(charge.transaction_id)
    assert (reversal.kind, reversal.amount, reversal.balance_after) == ("reverse", 1, 2)
    await clocked.set_credit_limit(user, 5)
    details = await clocked.get_balance_details(user)
    assert (details.balance, details.available, details.credit_limit) == (2, 7, 5)
    assert (await clocked.subtract(user, 4)).balance_after == -2  # overdraft
    assert (await clocked.add(user, 5)).balance_after == 3  # repays the debt first
    assert [t.kind for t in (await clocked.get_all_user_transactions(user))[:10]] == [
        "add", "subtract", "credit_limit", "reverse", "subtract", "release", "reserve",
        "capture", "reserve", "expire",
    ]  # fmt: skip
    report = await clocked.audit(user)  # HGETALL, XRANGE
    assert report.ok, report.problems

    await realtime.add(other, 1)  # TIME inside the script
    day = await realtime.start_cycle(2, "day", other)  # TIME before the script
    assert abs(day.started_at - datetime.now(day.started_at.tzinfo)) < timedelta(minutes=1)
    assert await realtime.get_balance(other) == 3

    admin.script_flush()  # as after a restart or a failover: the scripts are reloaded
    assert await clocked.get_balance(user) == 3
    assert (await clocked.subtract(user, 1)).balance_after == 2
    assert (await realtime.add(other, 1)).balance_after == 4
    await look(clocked, user)
    await look(realtime, other)


@pytest.mark.parametrize("api", ["sync", "async", "async-batched"])
async def test_the_acl_user_can_do_everything_the_library_does(
    acl_server: Server, api: str, clock: FakeClock
) -> None:
    url = acl_server.url("credici")
    clocked = make_client(api, url, namespace=NAMESPACE, clock=clock)
    realtime = make_client(api, url, namespace=NAMESPACE)
    try:
        await workload(clocked, realtime, clock, acl_server.admin, f"all-{api}")
    finally:
        await close(clocked)
        await close(realtime)


OPTIONAL_GRANTS = ("+copy", "+rename", "+xlen")
"""Grants only the compaction of a new history stream uses (docs/security.md): without them
nothing fails, a user's first history node keeps Redis's 4 KB."""
WORKER_GRANTS = sorted(grants(acl_rules("credici")) - set(OPTIONAL_GRANTS))


@pytest.mark.parametrize("grant", OPTIONAL_GRANTS)
async def test_an_optional_grant_missing_only_forgoes_the_compaction(
    acl_server: Server, grant: str, clock: FakeClock
) -> None:
    user = f"without-optional-{OPTIONAL_GRANTS.index(grant)}"
    acl_server.set_user(user, [rule for rule in acl_rules("credici") if rule != grant])
    url = acl_server.url(user)
    clocked = make_client("sync", url, namespace=NAMESPACE, clock=clock)
    realtime = make_client("sync", url, namespace=NAMESPACE)
    try:
        await workload(clocked, realtime, clock, acl_server.admin, f"opt-{grant}")
        fresh = f"opt-{grant}-fresh"
        await realtime.add(fresh, 1)
        keys = _keys.user_keys(NAMESPACE, fresh)
        assert acl_server.admin.xlen(keys.history) == 1
        assert (acl_server.admin.memory_usage(keys.history, samples=0) or 0) > 4096  # uncompacted
        assert not acl_server.admin.keys(f"{NAMESPACE}:*:c")  # no copy left behind
    finally:
        await close(clocked)
        await close(realtime)
        acl_server.admin.execute_command("ACL", "DELUSER", user)


async def test_the_documented_user_compacts_a_new_history(acl_server: Server) -> None:
    client = make_client("sync", acl_server.url("credici"), namespace=NAMESPACE)
    try:
        await client.add("compacted", 1)
    finally:
        await close(client)
    keys = _keys.user_keys(NAMESPACE, "compacted")
    assert (acl_server.admin.memory_usage(keys.history, samples=0) or 0) < 1024
    assert not acl_server.admin.exists(keys.scratch)


@pytest.mark.parametrize("grant", WORKER_GRANTS)
async def test_every_grant_is_needed(acl_server: Server, grant: str, clock: FakeClock) -> None:
    user = f"without-{WORKER_GRANTS.index(grant)}"
    acl_server.set_user(user, [rule for rule in acl_rules("credici") if rule != grant])
    acl_server.admin.function_flush()  # as on a fresh server: the library must be loaded
    url = acl_server.url(user)
    clocked = make_client("sync", url, namespace=NAMESPACE, clock=clock)
    realtime = make_client("sync", url, namespace=NAMESPACE)
    try:
        # Without +info the policy cannot be read: the storage refuses before anything else.
        refused = EvictionPolicyError if grant == "+info" else StorageError
        with pytest.raises(refused) as info:
            await workload(clocked, realtime, clock, acl_server.admin, f"no-{grant}")
        assert not isinstance(info.value, StorageUnavailableError)
        assert REFUSED.search(str(info.value)), info.value
    finally:
        await close(clocked)
        await close(realtime)
        acl_server.admin.execute_command("ACL", "DELUSER", user)


def scripts_acl(*grants: str) -> list[str]:
    """The worker's documented rules with the Functions grants replaced (an ACL of the
    scripts days)."""
    functions = {"+fcall", "+function|load"}
    rules = [rule for rule in acl_rules("credici") if rule not in functions]
    assert len(rules) == len(acl_rules("credici")) - 2
    return [*rules, *grants]


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize(
    "grants",
    [("+evalsha", "+eval"), ("+evalsha", "+script|load")],
    ids=["evalsha-eval", "evalsha-script-load"],
)
async def test_an_acl_for_scripts_alone_still_works(
    acl_server: Server, api: str, grants: tuple[str, ...], clock: FakeClock
) -> None:
    """The ACLs these docs gave before Functions (EVALSHA and EVAL; EVALSHA and SCRIPT LOAD):
    FCALL is refused once, then every call goes by EVALSHA; a NOSCRIPT is answered by the
    script's source (EVAL), or by loading the scripts and sending them by SHA again."""
    name = f"legacy-{api}-{grants[1].replace('|', '-')}"
    acl_server.set_user(name, scripts_acl(*grants))
    client = make_client(api, acl_server.url(name), namespace=NAMESPACE, clock=clock)
    user = f"user-of-{name}"
    try:
        acl_server.admin.script_flush()
        assert (await client.add(user, 5)).balance_after == 5
        acl_server.admin.script_flush()
        assert (await client.subtract(user, 2, idempotency_key="k")).balance_after == 3
        assert (await client.subtract(user, 2, idempotency_key="k")).balance_after == 3  # once
        assert await client.get_balance(user) == 3
    finally:
        await close(client)
        acl_server.admin.execute_command("ACL", "DELUSER", name)


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_without_function_load_the_library_loaded_by_an_admin_is_enough(
    acl_server: Server, api: str, clock: FakeClock
) -> None:
    """The least privilege: FCALL alone, the library loaded by an administrator."""
    from credici_redis._core.scripts import LIBRARY

    name = f"fcall-only-{api}"
    acl_server.set_user(name, [r for r in acl_rules("credici") if r != "+function|load"])
    acl_server.admin.function_flush()
    client = make_client(api, acl_server.url(name), namespace=NAMESPACE, clock=clock)
    user = f"user-of-{name}"
    try:
        with pytest.raises(StorageError, match=REFUSED):  # the library is missing: refused
            await client.add(user, 5)
        acl_server.admin.function_load(LIBRARY.source)  # the administrator loads it
        assert (await client.add(user, 5)).balance_after == 5  # the same client goes on
        assert await client.get_balance(user) == 5
    finally:
        await close(client)
        acl_server.admin.execute_command("ACL", "DELUSER", name)


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_the_acl_user_is_confined_to_its_namespace(acl_server: Server, api: str) -> None:
    acl_server.admin.set(f"{OTHER}:secret", "42")
    raw = redis.Redis(port=acl_server.port, username="credici", password=PASSWORD)
    try:
        refused = [
            ("GET", f"{OTHER}:secret"),
            ("SET", f"{OTHER}:secret", "0"),
            ("HSET", f"{OTHER}:{{u}}:s", "bal", "1000"),
            ("GET", "credici"),  # the namespace without its ':'
            ("GET", "credici1:x"),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "requirepass"),
            ("SCRIPT", "FLUSH"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FUNCTION", "FLUSH"),
            ("FUNCTION", "DELETE", "x"),
            ("EVAL", "return 1", "0"),
            ("DEL", f"{NAMESPACE}:{{u}}:s"),
            ("SUBSCRIBE", "x"),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                raw.execute_command(*command)
        # A library the user loads itself still runs with the user's permissions.
        lib = f"own{api}"
        register = "redis.register_function('{}', function(keys) return redis.call('GET', {}) end)"
        register += "\n"
        own = (
            f"#!lua name={lib}\n"
            + register.format(f"{lib}_get", "keys[1]")
            + register.format(f"{lib}_other", f"'{OTHER}:secret'")
        )
        raw.function_load(own)
        assert raw.fcall(f"{lib}_get", 1, f"{NAMESPACE}:{{u}}:x") is None
        with pytest.raises(redis.exceptions.NoPermissionError):
            raw.fcall(f"{lib}_get", 1, f"{OTHER}:secret")
        with pytest.raises(redis.exceptions.ResponseError, match=REFUSED):
            raw.fcall(f"{lib}_other", 0)
    finally:
        raw.close()
    assert acl_server.admin.get(f"{OTHER}:secret") == b"42"

    # Through the library: another namespace is refused (StorageError, not an outage) and
    # nothing is written there.
    outsider = make_client(api, acl_server.url("credici"), namespace=OTHER)
    try:
        with pytest.raises(StorageError) as info:
            await outsider.add("u", 1)
        assert not isinstance(info.value, StorageUnavailableError)
        assert acl_server.admin.keys(f"{OTHER}:{{*") == []
    finally:
        await close(outsider)


async def test_only_the_operator_user_may_scan(acl_server: Server) -> None:
    with CrediciClient.from_url(acl_server.url("credici"), namespace=NAMESPACE) as worker:
        worker.add("scanned", 1)
        with pytest.raises(StorageError):
            list(worker.scan_users())
    with CrediciClient.from_url(acl_server.url("credici-ops"), namespace=NAMESPACE) as ops:
        users = {user for batch in ops.scan_users() for user in batch}
        assert "scanned" in users
        assert ops.audit("scanned").ok


QUIET = ["-p", "no:cacheprovider"]


@pytest.mark.slow
def test_the_contract_suite_passes_as_the_test_acl_user(acl_server: Server) -> None:
    env = {
        **os.environ,
        "CREDICI_TEST_REDIS_URL": acl_server.url("credici-tests"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/contract", "-k", "redis", "-q", "-x", *QUIET],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    tail = (done.stdout + done.stderr)[-3000:]
    if done.returncode != 0 and REFUSED.search(done.stdout + done.stderr):
        pytest.fail(
            "the contract suite needs a command or key that docs/security.md does not grant: "
            f"update the ACL lines there (and `workload` here)\n{tail}"
        )
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and " failed" not in done.stdout, tail
    # The tests ran against this server, as that user: their keys went through it.
    assert acl_server.admin.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0) > 100


# --- TLS -------------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def sign(directory: Path, name: str, subject: str, extensions: str) -> None:
    """A P-256 key and a certificate for it signed by the test CA."""
    (directory / f"{name}.ext").write_text(extensions + "\n")
    openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@dataclass
class TlsFiles:
    directory: Path

    def __getitem__(self, name: str) -> str:
        return str(self.directory / name)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 only, and a client certificate."""
    directory = tmp_path_factory.mktemp("tls")
    openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=credici test CA",
        cwd=directory,
    )  # fmt: skip
    sign(directory, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    sign(directory, "client", "/CN=credici", "extendedKeyUsage=clientAuth")
    # A CA nobody trusts, to check that the client verifies the server.
    stranger = directory / "stranger"
    stranger.mkdir()
    openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=stranger", cwd=stranger,
    )  # fmt: skip
    return TlsFiles(directory)


NO_TLS = re.compile(
    r"tls-port.*\n?.*Bad directive|TLS (is )?not (supported|built|compiled)|without TLS",
    re.IGNORECASE,
)


def start_tls_redis(
    directory: Path, files: TlsFiles, auth_clients: str
) -> tuple[Server, subprocess.Popen[bytes]]:
    port = free_port()
    admin = redis.Redis(
        host="127.0.0.1",  # the only name the certificate has
        port=port,
        password=ADMIN_PASSWORD,
        ssl=True,
        ssl_ca_certs=files["ca.crt"],
        ssl_certfile=files["client.crt"],
        ssl_keyfile=files["client.key"],
        socket_timeout=10,
    )
    args = ["--port", "0", "--tls-port", str(port), "--requirepass", ADMIN_PASSWORD]
    args += ["--tls-cert-file", files["server.crt"], "--tls-key-file", files["server.key"]]
    args += ["--tls-ca-cert-file", files["ca.crt"], "--tls-auth-clients", auth_clients]
    try:
        proc = start_redis(directory, args, admin.ping)
    except ServerDidNotStart as exc:
        admin.close()
        message = str(exc)
        # The only reason to skip: an environment whose redis-server has no TLS compiled in.
        if "tls" in message.lower() and (
            "not" in message.lower() or "bad directive" in message.lower()
        ):
            pytest.skip(f"this redis-server was built without TLS support: {message.strip()[:300]}")
        raise
    server = Server(port, admin)
    server.set_user("credici", acl_rules("credici"))
    return server, proc


@pytest.fixture(scope="module", params=["no", "yes"], ids=["server-tls", "mutual-tls"])
def tls_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[tuple[Server, bool]]:
    directory = tmp_path_factory.mktemp(f"tls-{request.param}")
    server, proc = start_tls_redis(directory, tls_files, request.param)
    try:
        yield server, request.param == "yes"
    finally:
        server.admin.close()
        stop(proc)


@pytest.mark.parametrize("api", ["sync", "async", "async-batched"])
async def test_rediss_with_a_private_ca(
    tls_server: tuple[Server, bool], tls_files: TlsFiles, api: str, clock: FakeClock
) -> None:
    server, mutual = tls_server
    options: dict[str, Any] = {"namespace": NAMESPACE, "ssl_ca_certs": tls_files["ca.crt"]}
    if mutual:
        options |= {"ssl_certfile": tls_files["client.crt"], "ssl_keyfile": tls_files["client.key"]}
    user = f"tls-{api}-{mutual}"
    client = make_client(api, server.url("credici", "rediss"), clock=clock, **options)
    try:
        added = await client.add(user, 10, idempotency_key="k", metadata={"over": "tls"})
        assert await client.add(user, 10, idempotency_key="k", metadata={"over": "tls"}) == added
        assert (await client.subtract(user, 4)).balance_after == 6
        assert await client.get_balance(user) == 6
        history = await client.get_all_user_transactions(user)
        assert [(t.kind, t.amount) for t in history] == [("subtract", -4), ("add", 10)]
        assert history[1].metadata == {"over": "tls"}
        server.admin.script_flush()
        assert (await client.start_cycle(5, "week", user)).granted == 5
        assert (await client.audit(user)).ok
    finally:
        await close(client)


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_tls_is_verified(
    tls_server: tuple[Server, bool], tls_files: TlsFiles, api: str
) -> None:
    server, mutual = tls_server
    own = {"ssl_certfile": tls_files["client.crt"], "ssl_keyfile": tls_files["client.key"]}
    trusted = {"ssl_ca_certs": tls_files["ca.crt"], **own}
    failing: list[tuple[str, dict[str, Any]]] = [
        (server.url("credici", "rediss"), own),  # the system CAs do not know the test CA
        (server.url("credici", "rediss"), {"ssl_ca_certs": tls_files["stranger/ca.crt"], **own}),
        (server.url("credici", "redis"), {}),  # plain text to the TLS port
        # The certificate names 127.0.0.1 only.
        (f"rediss://credici:{PASSWORD}@localhost:{server.port}/0", trusted),
    ]
    if mutual:  # the server asks for a client certificate
        failing.append((server.url("credici", "rediss"), {"ssl_ca_certs": tls_files["ca.crt"]}))
    for url, options in failing:
        client = make_client(api, url, namespace=NAMESPACE, timeout=2, **options)
        try:
            with pytest.raises(StorageUnavailableError):
                await client.get_balance("u")
        finally:
            await close(client)


def test_tls_tools_are_here() -> None:
    """The TLS tests need openssl and redis-server: missing, they must fail, not skip."""
    assert shutil.which("openssl"), "openssl is not on PATH"
    assert shutil.which("redis-server"), "redis-server is not on PATH"


@pytest.mark.parametrize("grant", ["+xinfo|groups", "+xpending"])
def test_without_an_event_trimming_grant_events_are_read_and_kept(
    acl_server: Server, grant: str
) -> None:
    """XINFO GROUPS and XPENDING only let a consumer drop the events every group acknowledged:
    without either, events are read and acknowledged as before, and nothing fails."""
    from credici_redis import CrediciClient

    user = f"events-without-{grant.strip('+').replace('|', '-')}"
    acl_server.set_user(user, [rule for rule in acl_rules("credici-ops") if rule != grant])
    client = CrediciClient.from_url(acl_server.url(user), namespace=NAMESPACE)
    try:
        client.storage.ledger.events_kept_ms = 0  # type: ignore[attr-defined]
        who = f"events-{grant}"
        client.add(who, 10)
        client.set_low_balance_threshold(who, 5)
        client.subtract(who, 6)
        got = list(client.events(group="g", idle_timeout=0.2, poll=0.02))
        assert [e.user_id for e in got] == [who]
        assert list(client.events(group="g", idle_timeout=0.2, poll=0.02)) == []  # acknowledged
        # Without XINFO GROUPS the event stays; without XPENDING only streams with events still
        # pending in a group are kept whole (XINFO alone says nothing is pending here).
        kept = acl_server.admin.xlen(_keys.user_keys(NAMESPACE, who).events)
        assert kept == (1 if grant == "+xinfo|groups" else 0)
    finally:
        client.close()
        acl_server.admin.execute_command("ACL", "DELUSER", user)
