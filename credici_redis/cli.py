"""``credici-redis``: the metering demo, and operator commands on a Redis store.

    credici-redis demo [--users N] [--workers N] [--seconds S] [--seed N]
    credici-redis balance USER
    credici-redis add USER AMOUNT [--ttl SECONDS | --expire-at ISO8601] [--idempotency-key K]
    credici-redis subtract USER AMOUNT [--idempotency-key K]
    credici-redis history USER [--from ISO8601] [--to ISO8601] [--json]
    credici-redis audit (USER | --all)
    credici-redis archive --postgres-url URL [--init | --lag | --once | --follow] [--keep DURATION]

The store is ``--redis-url`` or ``$CREDICI_REDIS_URL``; the history archive (PostgreSQL) is
``--postgres-url`` or ``$CREDICI_POSTGRES_URL``: with it, history and audit cover the archived
part. The demo runs on the embedded store
without one; the operator commands need a real Redis. Exit status: 0 done, 1 refused by the
ledger (or a failed demo audit), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
from tqdm import tqdm

from credici_redis._core.scripts import LIBRARY
from credici_redis._demo import DemoResult, run_demo
from credici_redis._storages.cluster import primaries
from credici_redis.client import CrediciClient
from credici_redis.errors import CrediciError, StorageError
from credici_redis.models import Transaction
from credici_redis.storage import DEFAULT_KEEP, DEFAULT_NAMESPACE

if TYPE_CHECKING:  # the archive needs the "postgres" extra: imported by the archive command
    from credici_redis.archive import ArchiveLag, ArchiveStats

URL_ENV = "CREDICI_REDIS_URL"
POSTGRES_ENV = "CREDICI_POSTGRES_URL"
PROG = "credici-redis"


class UsageError(Exception):
    """Arguments argparse accepted but the command cannot use; reported like argparse's errors."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status (the console script exits with it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "library":
            return _library(args)
        return _operate(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CrediciError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`history ... | head`): stop quietly, and keep Python's flush of
        # stdout at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    # The store options work before or after the command. After it, they are SUPPRESSed when
    # absent, so that the subcommand does not overwrite a value given before the command.
    store = argparse.ArgumentParser(add_help=False)
    _store_options(store, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Prepaid and subscription credits in Redis."
    )
    _store_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        parents=[store],
        help="run the metering simulation and audit the ledger",
        description=(
            "Subscribers on 30-day cycles, some with promo credits that expire within seconds, "
            "charged concurrently by worker threads sharing one client for --seconds; then every "
            "balance is checked against its history. Runs on the embedded store (memory://) "
            f"unless --redis-url or ${URL_ENV} is given, in a fresh namespace unless --namespace "
            "is. Exits 1 if the audit fails."
        ),
    )
    demo.add_argument(
        "--users", type=_positive_int, default=300, metavar="N", help="subscribers (300)"
    )
    demo.add_argument(
        "--workers", type=_positive_int, default=8, metavar="N", help="charging threads (8)"
    )
    demo.add_argument(
        "--seconds",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="how long the workers charge (10); the whole run takes about 1-2 s more",
    )
    demo.add_argument(
        "--seed", type=int, metavar="N", help="seed of the workload (default: random, printed)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    balance = commands.add_parser("balance", parents=[store], help="print a user's balance")
    balance.add_argument("user", metavar="USER")

    add = commands.add_parser("add", parents=[store], help="grant credits to a user")
    add.add_argument("user", metavar="USER")
    add.add_argument("amount", metavar="AMOUNT", type=int)
    expiry = add.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=float, metavar="SECONDS", help="expire after SECONDS")
    expiry.add_argument(
        "--expire-at", type=_instant, metavar="ISO8601", help="expire then (no offset = UTC)"
    )
    add.add_argument("--idempotency-key", metavar="K", help="retry-safe: K applies at most once")

    subtract = commands.add_parser("subtract", parents=[store], help="charge a user")
    subtract.add_argument("user", metavar="USER")
    subtract.add_argument("amount", metavar="AMOUNT", type=int)
    subtract.add_argument("--idempotency-key", metavar="K", help="retry-safe: K applies once")

    audit = commands.add_parser(
        "audit",
        parents=[store],
        help="rebuild balances and buckets from history and report differences",
    )
    _one_or_all(audit)

    trim = commands.add_parser(
        "trim",
        parents=[store],
        help="remove history older than --retention (after a checkpoint the audit replays from)",
    )
    _one_or_all(trim)
    trim.add_argument(
        "--retention", type=_duration, required=True, metavar="DURATION", help="e.g. 30d"
    )

    recover = commands.add_parser(
        "recover-transfers",
        parents=[store],
        help="finish the transfers a process left unsettled (run it every minute, e.g. by cron)",
    )
    recover.add_argument(
        "--older-than", type=_duration, default=timedelta(seconds=30), metavar="DURATION",
        help="leave younger ones alone: they may still be on their way (default 30s)",
    )  # fmt: skip

    console = commands.add_parser(
        "console",
        parents=[store],
        help="serve the operator console (a user's credits in a browser)",
        description=(
            "Serves credici_redis.console on --host:--port (127.0.0.1:8080) with uvicorn. Anyone "
            "who reaches the port may act as operator: keep it local, or put it behind your "
            "own authentication (or mount create_app in your service, with `authorize`)."
        ),
    )
    console.add_argument("--host", default="127.0.0.1", help="address to listen on")
    console.add_argument("--port", type=int, default=8080, help="port (8080)")
    console.add_argument("--read-only", action="store_true", help="no actions, only reading")
    console.add_argument(
        "--operator", default=None, metavar="NAME",
        help="the name kept with each action's reason (default: the login name)",
    )  # fmt: skip

    history = commands.add_parser("history", parents=[store], help="a user's transactions")
    history.add_argument("user", metavar="USER")
    history.add_argument("--from", dest="from_", type=_instant, metavar="ISO8601")
    history.add_argument("--to", dest="to_", type=_instant, metavar="ISO8601")
    history.add_argument("--json", action="store_true", help="one JSON object per line")

    library = commands.add_parser(
        "library",
        parents=[store],
        help="load the Functions library of this version into Redis (or print it)",
        description=(
            "Every operation runs as a function of one Redis Functions library, which the "
            "clients load themselves where it is missing. Load it here as an administrator "
            "(on each primary with --cluster) when the clients' ACL user may not (without "
            '"+function|load"); RDB/AOF keep it and replicas get it. --print writes its source '
            "instead, for FUNCTION LOAD by other means."
        ),
    )
    library.add_argument("--print", action="store_true", help="print the source, load nothing")
    library.add_argument("--cluster", action="store_true", help="the URL names a cluster node")

    archive = commands.add_parser(
        "archive",
        parents=[store],
        help="move history from Redis to PostgreSQL (see credici_redis.archive)",
        description=(
            "Copies every user's new history entries to the PostgreSQL table credici_history "
            "(created by --init or the first run), then lets Redis trim what PostgreSQL holds "
            "once it is older than --keep. Prints the lag (oldest entry not yet archived, "
            "entries waiting) after each pass."
        ),
    )
    mode = archive.add_mutually_exclusive_group()
    mode.add_argument("--init", action="store_true", help="create the table, then stop")
    mode.add_argument("--lag", action="store_true", help="print the lag, then stop")
    mode.add_argument("--once", action="store_true", help="one pass (the default)")
    mode.add_argument("--follow", action="store_true", help="pass after pass, until Ctrl-C")
    archive.add_argument(
        "--keep",
        type=_duration,
        default=DEFAULT_KEEP,
        metavar="DURATION",
        help="archived entries younger than this stay in Redis too: 30s, 15m, 12h, 7d (7d)",
    )
    archive.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="S", help="idle pause (1)"
    )
    archive.add_argument("--cluster", action="store_true", help="the URL names a cluster node")
    archive.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _one_or_all(parser: argparse.ArgumentParser) -> None:
    """USER, or --all users in SCAN batches (`_each_user`)."""
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("user", metavar="USER", nargs="?")
    who.add_argument("--all", action="store_true", help="every user of the namespace (SCAN)")
    parser.add_argument("--batch", type=_positive_int, default=500, metavar="N", help="SCAN batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _each_user(client: CrediciClient, args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """The user of a `_one_or_all` command, or every user in SCAN batches, each with the progress
    bar (to write a line under it)."""
    with tqdm(desc=args.command, unit=" users", disable=args.no_progress, file=sys.stderr) as bar:
        for users in [[args.user]] if not args.all else client.scan_users(args.batch):
            for user in users:
                yield user, bar
                bar.update()


def _store_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--redis-url",
        default=default,
        help=f"redis://host:port/db of the store (default: ${URL_ENV})",
    )
    parser.add_argument(
        "--postgres-url",
        "--archive-url",
        dest="postgres_url",
        default=default,
        help=f"postgresql:// URL of the history archive (default: ${POSTGRES_ENV})",
    )
    parser.add_argument(
        "--namespace",
        default=default,
        help=f"key prefix of the ledger (default: {DEFAULT_NAMESPACE!r}; demo: a fresh one)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration like 30s, 15m, 12h, 7d: {text!r}"
        ) from None
    if not 0 <= value < 10**9:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return timedelta(seconds=value)


def _instant(text: str) -> datetime:
    """ISO 8601; a trailing 'Z' is accepted (Python 3.10's fromisoformat refuses it)."""
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date and time: {text!r}") from None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _demo(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get(URL_ENV) or "memory://"
    namespace = args.namespace or f"demo-{secrets.token_hex(4)}"
    print(
        f"{args.users} users, {args.workers} workers, {args.seconds:g} s of charging "
        f"on {_redacted(url)} (namespace {namespace!r})"
    )
    result = run_demo(
        url,
        namespace=namespace,
        users=args.users,
        workers=args.workers,
        seconds=args.seconds,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(_report(result))
    if not url.startswith("memory:") and result.ok:
        print(
            f"the data is kept; see: {PROG} --redis-url {_redacted(url)} "
            f"--namespace {namespace} history user-0001"
        )
    return 0 if result.ok else 1


def _report(result: DemoResult) -> str:
    charges = result.accepted + result.rejected
    rejected_share = result.rejected / charges if charges else 0.0
    lines = [
        f"seed            {result.seed}",
        f"charges         {result.accepted} accepted, {result.rejected} rejected "
        f"({rejected_share:.0%}); {result.topups} top-ups",
        f"credits         {result.granted} granted, {result.spent} spent, "
        f"{result.expired} expired, {result.balance_total} left",
        f"throughput      {result.ops} ops in {result.seconds:.1f} s = "
        f"{result.ops_per_second:,.0f} ops/s",
    ]
    if result.ok:
        lines.append(
            f"audit           OK: all {result.users} balances match their histories "
            "and the workers' counts"
        )
    else:
        lines.append(f"audit           FAILED: {len(result.problems)} problems")
        lines.extend(f"  {problem}" for problem in result.problems[:20])
    return "\n".join(lines)


def _library(args: argparse.Namespace) -> int:
    """Print the Functions library, or load it on the server (each primary of a cluster)."""
    if args.print:
        print(LIBRARY.source, end="")
        return 0
    url = args.redis_url or os.environ.get(URL_ENV)
    if not url or url.startswith("memory:"):
        raise UsageError(f"library needs --redis-url or ${URL_ENV} (a Redis server)")
    client: Any = (
        redis.cluster.RedisCluster.from_url(url) if args.cluster else redis.Redis.from_url(url)
    )
    try:
        for node in primaries(client):
            where = _redacted(url) if node is None else node.name
            target = {} if node is None else {"target_nodes": node}
            try:
                client.execute_command("FUNCTION", "LOAD", LIBRARY.source, **target)
                print(f"{LIBRARY.name}: loaded on {where}")
            except redis.ResponseError as exc:
                if "already exists" not in str(exc):
                    raise StorageError(f"FUNCTION LOAD refused on {where}: {exc}") from exc
                print(f"{LIBRARY.name}: already on {where}")
    except redis.RedisError as exc:
        raise StorageError(f"could not load the library: {exc}") from exc
    finally:
        client.close()
    return 0


def _operate(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"{args.command} needs --redis-url or ${URL_ENV}")
    if url.startswith("memory:"):
        raise UsageError("memory:// lives only as long as one command; give a Redis URL")
    postgres = args.postgres_url or os.environ.get(POSTGRES_ENV)
    namespace = args.namespace or DEFAULT_NAMESPACE
    if args.command == "archive":
        return _archive(url, postgres, namespace, args)
    if args.command == "console":
        return _console(url, postgres, namespace, args)
    retention = args.retention if args.command == "trim" else None
    with CrediciClient.from_url(
        url, namespace=namespace, archive_url=postgres, history_retention=retention
    ) as client:
        if args.command == "balance":
            print(client.get_balance(args.user))
        elif args.command == "add":
            ttl = None if args.ttl is None else timedelta(seconds=args.ttl)
            tx = client.add(
                args.user,
                args.amount,
                args.expire_at,
                ttl=ttl,
                idempotency_key=args.idempotency_key,
            )
            print(_describe(tx))
        elif args.command == "subtract":
            tx = client.subtract(args.user, args.amount, idempotency_key=args.idempotency_key)
            print(_describe(tx))
        elif args.command == "audit":
            return _audit(client, args)
        elif args.command == "trim":
            return _trim(client, args)
        elif args.command == "recover-transfers":
            done = client.recover_transfers(older_than=args.older_than)
            print(
                f"completed {done.completed}, refunded {done.refunded}, "
                f"unresolved {len(done.unresolved)}, failed {len(done.failed)}"
            )
            for line in [*(f"unresolved {t}" for t in done.unresolved), *done.failed]:
                print(f"  {line}")
            return 0 if not (done.unresolved or done.failed) else 1
        else:
            _history(client, args)
    return 0


def _audit(client: CrediciClient, args: argparse.Namespace) -> int:
    """Audit one user, or every user in SCAN batches; exit 1 if any report is not clean."""
    if not args.all:
        report = client.audit(args.user)
        print(
            f"{report.user_id}: {'ok' if report.ok else 'FAILED'}, balance {report.balance}, "
            f"{report.entries} entries, {report.buckets} buckets"
        )
        for problem in report.problems:
            print(f"  {problem}")
        return 0 if report.ok else 1
    audited = failed = 0
    for user, bar in _each_user(client, args):
        report = client.audit(user)
        audited += 1
        if not report.ok:
            failed += 1
            bar.write(f"{user}: FAILED")
            for problem in report.problems:
                bar.write(f"  {problem}")
    print(f"audited {audited} users: {audited - failed} ok, {failed} failed")
    return 0 if failed == 0 else 1


def _trim(client: CrediciClient, args: argparse.Namespace) -> int:
    """Trim one user's history, or every user's in SCAN batches; exit 1 if a replay found a
    problem (that user's history stays: audit it)."""
    users_seen = trimmed = failed = archived = 0
    for user, bar in _each_user(client, args):
        report = client.trim_history(user)
        while report.more and not report.problems:
            more = client.trim_history(user)
            report = more.model_copy(update={"trimmed": report.trimmed + more.trimmed})
        users_seen += 1
        trimmed += report.trimmed
        archived += report.archived
        if report.problems:
            failed += 1
            bar.write(f"{user}: NOT TRIMMED, its history does not add up")
            for problem in report.problems:
                bar.write(f"  {problem}")
    print(
        f"trimmed {trimmed} entries of {users_seen} users; {failed} not trimmed (problems), "
        f"{archived} left to the archiver"
    )
    return 0 if failed == 0 else 1


def _console(url: str, postgres: str | None, namespace: str, args: argparse.Namespace) -> int:
    import getpass

    from credici_redis._core import extras
    from credici_redis.client import AsyncCrediciClient
    from credici_redis.console import create_app

    uvicorn = extras.need("uvicorn", feature="the console command", extra="console")
    client = AsyncCrediciClient.from_url(url, namespace=namespace, archive_url=postgres)
    name = args.operator or getpass.getuser()
    app = create_app(
        client, read_only=args.read_only, authorize=lambda request: name, close_client=True
    )
    print(f"credici console on http://{args.host}:{args.port}/ (namespace {namespace})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _archive(url: str, postgres: str | None, namespace: str, args: argparse.Namespace) -> int:
    if not postgres:
        raise UsageError(f"archive needs --postgres-url or ${POSTGRES_ENV}")
    from credici_redis.archive import Archiver

    with Archiver(url, postgres, namespace=namespace, keep=args.keep, cluster=args.cluster) as job:
        if args.init:
            job.init_schema()
            print("the table credici_history is ready")
            return 0
        if args.lag:
            print(_lag(job.lag()))
            return 0
        bar = tqdm(desc="archive", unit=" entries", disable=args.no_progress, file=sys.stderr)
        seen = 0

        def progress(stats: ArchiveStats) -> None:
            nonlocal seen
            bar.update(stats.entries - seen)
            seen = stats.entries

        with bar:
            while True:
                seen = 0
                stats = job.run_once(progress)
                bar.write(
                    f"archived {stats.entries} entries of {stats.users} users in "
                    f"{stats.seconds:.2f} s, trimmed {stats.trimmed} from Redis; " + _lag(job.lag())
                )
                if not args.follow:
                    return 0
                if stats.entries == 0 and stats.trimmed == 0:
                    time.sleep(args.interval)


def _lag(lag: ArchiveLag) -> str:
    if lag.oldest_unarchived is None:
        return "lag: nothing waiting"
    return (
        f"lag: {lag.seconds:.1f} s (oldest unarchived entry {_when(lag.oldest_unarchived)}), "
        f"{lag.entries_pending} entries of {lag.users_pending} users waiting"
    )


def _history(client: CrediciClient, args: argparse.Namespace) -> None:
    if args.from_ is None and args.to_ is None:
        history = client.get_all_user_transactions(args.user)
    else:
        history = client.get_user_transactions_for_period(
            args.user,
            args.from_ or datetime(1970, 1, 1, tzinfo=timezone.utc),
            args.to_ or datetime(9999, 12, 31, tzinfo=timezone.utc),
        )
    if args.json:
        for tx in history:
            print(json.dumps(tx.model_dump(mode="json"), ensure_ascii=False))
        return
    if not history:
        print(f"no transactions for {args.user!r}")
        return
    print(f"{'created_at':<29} {'kind':<11} {'amount':>9} {'balance':>9}  {'expire_at':<29} key")
    for tx in history:
        expire_at = _when(tx.expire_at) if tx.expire_at else "-"
        print(
            f"{_when(tx.created_at):<29} {tx.kind:<11} {tx.amount:>+9} {tx.balance_after:>9}  "
            f"{expire_at:<29} {tx.idempotency_key or '-'}"
        )


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _describe(tx: Transaction) -> str:
    """One line for a change: what, for whom, the balance after, and its transaction id."""
    expiry = f", expiring {_when(tx.expire_at)}" if tx.expire_at else ""
    return (
        f"{tx.amount:+} credits for {tx.user_id!r}{expiry}: balance {tx.balance_after} "
        f"(transaction {tx.transaction_id})"
    )
