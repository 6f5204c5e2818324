"""End-to-end benchmark: postback-worker's pipeline against a naive one-task-per-conversion
Celery baseline, on the same machine, PostgreSQL, Redis and local partner server.

    .venv/bin/python bench/e2e.py [--conversions N] [--naive-conversions M] [--runs R]
        [--workers W] [--concurrency C] [--partner-delay-ms D] [--only ours|naive]
        [--producer-batch K[,K...]] [--producer-threads T] [--no-ceiling]
        [--partner-method get|post-json|both] [--updates FRACTION] [--json out.json]

--partner-method both measures ours twice in the same run, with a GET partner and with a
partner that takes a JSON body by POST, and prints the post-json / get throughput ratio.

See bench/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from postback_worker.dev import services as devservices  # noqa: E402
from postback_worker.ops.config import parse_offer, parse_partner  # noqa: E402
from postback_worker.producer import Producer  # noqa: E402
from postback_worker.settings import Settings  # noqa: E402
from postback_worker.store.db import make_engine, normalize_url, upgrade  # noqa: E402
from postback_worker.store.repo import Store  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is installed in the dev venv
    psutil = None

OFFER_ID = "o1"
PARTNER_ID = "p1"
PAYOUT = "1.00"
PATH_QS = "/pb?tid={transaction_id}&payout={payout}&pb={postback_id}"
# The same macros as a JSON body (--partner-method post-json).
JSON_BODY = ('{"tid": "{transaction_id}", "payout": "{payout}", "pb": "{postback_id}", '
             '"currency": "{currency}", "sub": "{aff_sub}"}')
GET, POST_JSON = "get", "post-json"
BATCH = 500  # default conversions per Producer.send_conversions call (--producer-batch)
QUEUES = "conversions,retries,replay,maintenance"
POLL_INTERVAL = 0.1
RSS_INTERVAL = 0.1
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
LOOPBACK = ("127.0.0.0/8",)


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen in time (message says what)."""


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    """A subprocess in its own process group (Ctrl-C in the terminal does not reach it; we stop
    it ourselves, group and all)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path,
                 stdout_pipe: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self.unread = b""  # stdout read past the last line _read_line returned
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        try:
            if self.proc.poll() is None:
                # SIGTERM to the main process only, as deploy/ stops a worker (systemd
                # KillMode=mixed, Kubernetes and compose signal PID 1): Celery's warm shutdown
                # lets pool children finish the task they run. Signalling the whole group
                # killed a child mid-task (WorkerLostError ... signal 15).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not stop within {timeout:.0f}s: SIGKILL")
            # Whatever is left in the group (pool children of a killed parent, ...).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _read_line(proc: Proc, prefix: str, timeout: float) -> str:
    """The first line starting with `prefix` that `proc` printed; what it printed after that
    line stays for the next call (LOOP and READY may arrive in one read)."""
    assert proc.proc.stdout is not None
    fd = proc.proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = proc.unread
    while True:
        lines = buf.split(b"\n")
        for i, raw in enumerate(lines[:-1]):  # complete lines only
            line = raw.decode(errors="replace")
            if line.startswith(prefix):
                proc.unread = b"\n".join(lines[i + 1:])
                return line
        if time.monotonic() >= deadline:
            break
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with code {proc.proc.returncode}:\n{proc.tail()}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if chunk:
            buf += chunk
    raise BenchError(f"{proc.name} did not print {prefix!r} within {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------
# partner


class Partner:
    kind = "?"
    base_url = ""

    def count(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class PythonPartner(Partner):
    """bench/fast_partner.py in its own process."""

    def __init__(self, tmp: Path, delay_ms: float) -> None:
        args = [sys.executable, str(ROOT / "bench" / "fast_partner.py"), "--delay-ms",
                str(delay_ms)]
        self.proc = Proc("partner", args, dict(os.environ), tmp / "partner.log", stdout_pipe=True)
        try:
            loop = _read_line(self.proc, "LOOP ", READY_TIMEOUT).split()[1]
            port = int(_read_line(self.proc, "READY ", READY_TIMEOUT).split()[1])
        except BaseException:
            self.proc.stop()
            raise
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.kind = f"python asyncio raw protocol ({loop})" + (
            f", delay {delay_ms:g} ms" if delay_ms else "")

    def count(self) -> int:
        status, body = _http_get("127.0.0.1", self.port, "/__count")
        if status != 200:
            raise BenchError(f"partner /__count answered {status}")
        return int(body)

    def reset(self) -> None:
        _http_get("127.0.0.1", self.port, "/__reset")

    def stop(self) -> None:
        self.proc.stop()


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "OK";
        }}
    }}
}}
"""


class NginxPartner(Partner):
    """nginx answering `200 OK` to everything; requests counted from its access log."""

    def __init__(self, binary: str, tmp: Path) -> None:
        d = tmp / "nginx"
        d.mkdir()
        d.chmod(0o777)  # worker processes may run as an unprivileged user
        self.port = devservices.free_port()
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=d, port=self.port))
        self.access_log = d / "nginx-access.log"
        self.proc = Proc("nginx", [binary, "-p", str(d), "-c", str(conf)], dict(os.environ),
                         tmp / "nginx.out")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not self.proc.alive():
                err = (d / "nginx-error.log")
                raise BenchError("nginx exited: " + (err.read_text() if err.exists() else ""))
            try:
                if _http_get("127.0.0.1", self.port, "/__ready", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.stop()
                raise BenchError(f"nginx did not answer on port {self.port}")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.kind = "nginx"
        self._base = 0
        self.reset()

    def _lines(self) -> int:
        if not self.access_log.exists():
            return 0
        with open(self.access_log, "rb") as f:
            return sum(1 for line in f if b'"GET /pb?' in line)

    def count(self) -> int:
        return self._lines() - self._base

    def reset(self) -> None:
        self._base = self._lines()

    def stop(self) -> None:
        self.proc.stop()


def start_partner(kind: str, tmp: Path, delay_ms: float) -> Partner:
    nginx = shutil.which("nginx")
    if kind == "nginx" or (kind == "auto" and nginx and delay_ms <= 0):
        if not nginx:
            raise BenchError("--partner nginx: no nginx binary on PATH")
        if delay_ms > 0:
            raise BenchError("--partner nginx cannot delay answers; use --partner python")
        return NginxPartner(nginx, tmp)
    return PythonPartner(tmp, delay_ms)


# ---------------------------------------------------------------------------------------------
# database and redis


@dataclass
class Services:
    server_url: str
    db_name: str
    db_url: str
    redis_url: str
    store: Store


@contextlib.contextmanager
def bench_database(server_url: str) -> Iterator[tuple[str, str]]:
    name = f"pbw_bench_{secrets.token_hex(4)}"
    admin = create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        base, _, query = server_url.partition("?")
        url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
        try:
            yield name, url
        finally:
            with admin.connect() as conn:
                conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ), {"n": name})
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            log(f"dropped database {name}")
    finally:
        admin.dispose()


def configure_partner(store: Store, partner_base: str, method: str) -> None:
    """The partner as a GET postback URL, or a POST with a JSON body from the same macros."""
    data: dict[str, Any] = {"id": PARTNER_ID, "postback_url": partner_base + PATH_QS}
    if method == POST_JSON:
        data.update(postback_url=partner_base + "/pb", method="POST", body_format="json",
                    body_template=JSON_BODY)
    store.upsert_partner(parse_partner(data, datetime.now(UTC)))


def seed(store: Store, partner_base: str, n_clicks: int) -> None:
    now = datetime.now(UTC)
    store.upsert_offer(parse_offer({"id": OFFER_ID, "campaign_type": "ecommerce"}, now))
    configure_partner(store, partner_base, GET)
    clicked = now - timedelta(days=1)
    for start in range(0, n_clicks, 5000):
        store.insert_clicks([
            {"transaction_id": tx(i), "offer_id": OFFER_ID, "aff_id": PARTNER_ID,
             "aff_sub": None, "aff_sub2": None, "aff_sub3": None, "aff_sub4": None,
             "aff_sub5": None, "source": None, "ip": None, "device_id": None,
             "user_agent": None, "clicked_at": clicked}
            for i in range(start, min(n_clicks, start + 5000))
        ])


def tx(i: int) -> str:
    return f"tx{i:08d}"


def reset_state(svc: Services) -> None:
    import redis

    with svc.store.engine.begin() as conn:
        conn.execute(text(
            "TRUNCATE attempts, dead_letters, postbacks, conversion_keys, conversion_events, "
            "conversions CASCADE"))
    client = redis.Redis.from_url(svc.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# measuring


class RssSampler:
    """Peak RSS of the worker processes (main + pool children), sampled every 100 ms."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.max_proc = 0
        self.max_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _all_pids(self) -> list[int]:
        if psutil is None:
            return list(self.pids) + [c for p in self.pids for c in _proc_children(p)]
        out = []
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                out.append(pid)
                out.extend(c.pid for c in p.children(recursive=True))
            except psutil.Error:
                continue
        return out

    def sample(self) -> None:
        total = 0
        for pid in self._all_pids():
            rss = _rss(pid)
            total += rss
            self.max_proc = max(self.max_proc, rss)
        self.max_sum = max(self.max_sum, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_INTERVAL)


def _rss(pid: int) -> int:
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            for k in kids:
                out.append(int(k))
                out.extend(_proc_children(int(k)))
    except OSError:
        pass
    return out


def wait_ready(broker_url: str, names: list[str], procs: list[Proc], timeout: float) -> float:
    """Until every worker node answers a remote-control ping; returns the seconds it took."""
    control = Celery("bench_control", broker=broker_url)
    control.conf.broker_connection_retry_on_startup = True
    started = time.monotonic()
    deadline = started + timeout
    try:
        while True:
            for p in procs:
                if not p.alive():
                    raise BenchError(
                        f"{p.name} exited with code {p.proc.returncode} during start-up:\n"
                        f"{p.tail()}")
            replies = control.control.ping(timeout=0.5) or []
            seen = {name for reply in replies for name in reply}
            if all(any(s.startswith(n + "@") for s in seen) for n in names):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise BenchError(
                    f"workers not ready within {timeout:.0f}s (answered: {sorted(seen)}); "
                    f"last log lines:\n" + "\n".join(p.tail(10) for p in procs))
    finally:
        control.close()


def delivered_count(svc: Services) -> int:
    with svc.store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM postbacks WHERE state = 'delivered'")).scalar_one())


def state_summary(svc: Services) -> dict[str, dict[str, int]]:
    with svc.store.engine.connect() as conn:
        pb = {r[0]: r[1] for r in conn.execute(text(
            "SELECT state, count(*) FROM postbacks GROUP BY state"))}
        cv = {r[0]: r[1] for r in conn.execute(text(
            "SELECT state, count(*) FROM conversions GROUP BY state"))}
    return {"postbacks": {k: int(v) for k, v in pb.items()},
            "conversions": {k: int(v) for k, v in cv.items()}}


def wait_delivered(svc: Services, n: int, procs: list[Proc], timeout: float,
                   stall: float) -> int:
    """Poll (one COUNT every 100 ms) until n postbacks are delivered."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        done = delivered_count(svc)
        now = time.monotonic()
        if done >= n:
            return done
        if done != last:
            last, last_change = done, now
        dead = [p for p in procs if not p.alive()]
        problem = None
        if dead:
            problem = f"{dead[0].name} exited with code {dead[0].proc.returncode}"
        elif now - last_change > stall:
            problem = f"no progress for {stall:.0f}s"
        elif now > deadline:
            problem = f"not finished within {timeout:.0f}s"
        if problem:
            raise BenchError(
                f"{problem}: {done}/{n} delivered; states {state_summary(svc)}; "
                "worker log tail:\n" + "\n".join(p.tail(15) for p in procs))
        time.sleep(POLL_INTERVAL)


def figures(svc: Services, t0: datetime) -> dict[str, Any]:
    with svc.store.engine.connect() as conn:
        row = conn.execute(text("""
            SELECT count(*),
                   max(delivered_at),
                   percentile_cont(0.5) WITHIN GROUP (
                       ORDER BY extract(epoch FROM delivered_at - received_at)),
                   percentile_cont(0.99) WITHIN GROUP (
                       ORDER BY extract(epoch FROM delivered_at - received_at)),
                   max(extract(epoch FROM delivered_at - received_at)),
                   min(delivered_at)
            FROM postbacks WHERE state = 'delivered'
        """)).one()
        attempts = int(conn.execute(text("SELECT count(*) FROM attempts")).scalar_one())
    count, last, p50, p99, worst, first = row
    span = (last - t0).total_seconds()
    return {
        "delivered": int(count), "attempts_rows": attempts,
        "seconds_first_enqueue_to_last_delivery": round(span, 3),
        "seconds_first_enqueue_to_first_delivery": round((first - t0).total_seconds(), 3),
        "postbacks_per_s": round(count / span, 1) if span > 0 else None,
        "p50_ms": round(float(p50) * 1000, 1), "p99_ms": round(float(p99) * 1000, 1),
        "max_ms": round(float(worst) * 1000, 1),
    }


# ---------------------------------------------------------------------------------------------
# the two systems


@dataclass
class Config:
    n: int
    naive_n: int
    runs: int
    workers: int
    concurrency: int
    delay_ms: float
    timeout: float
    stall: float
    ours_app: str = "postback_worker.worker.app"
    # Conversions/s offered at a steady pace (0: everything at once, as fast as possible).
    rate: float = 0.0
    # Events per Producer.send_conversions call, one system per value.
    producer_batches: tuple[int, ...] = (BATCH,)
    # Threads calling send_conversions at once (1: one call after the other).
    producer_threads: int = 1


PACE_TICK = 0.05  # a steady producer sends what is due every 50 ms


def paced(n: int, rate: float, send: Callable[[int, int], None], batch: int = BATCH) -> None:
    """Call send(start, stop) for consecutive slices of range(n) of at most `batch` events:
    all at once when rate is 0, else every PACE_TICK what the rate has made due since the
    last tick (a backend that sends what it produced in the last 50 ms, `batch` per call)."""
    if not rate:
        for start in range(0, n, batch):
            send(start, min(n, start + batch))
        return
    begin = time.monotonic()
    sent = 0
    tick = 0
    while sent < n:
        due = min(n, int((time.monotonic() - begin) * rate))
        while due > sent:
            stop = min(due, sent + batch)
            send(sent, stop)
            sent = stop
        tick += 1
        time.sleep(max(0.0, begin + tick * PACE_TICK - time.monotonic()))


@dataclass
class System:
    label: str
    n: int
    worker_args: Callable[[str], list[str]]
    worker_env: dict[str, str]
    enqueue: Callable[[int], None]
    expected_conversion_state: str = "attributed"
    runs: list[dict[str, Any]] = field(default_factory=list)
    partner_method: str = GET


def ours_system(cfg: Config, svc: Services, batch: int = BATCH,
                method: str = GET) -> System:
    settings = Settings.build(database_url=svc.db_url, redis_url=svc.redis_url,
                        allow_networks=LOOPBACK)
    env = {**os.environ, **settings.to_env()}

    def args(node: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", cfg.ours_app, "worker",
                "-Q", QUEUES, "--concurrency", str(cfg.concurrency), "-n", f"{node}@%h",
                "-l", "warning", "--without-mingle", "--without-gossip"]

    def enqueue(n: int) -> None:
        producer = Producer(settings)

        def send(a: int, b: int) -> None:
            producer.send_conversions(
                [{"transaction_id": tx(i), "payout": PAYOUT} for i in range(a, b)])

        try:
            if cfg.producer_threads <= 1:
                paced(n, cfg.rate, send, batch)
                return
            # A busy backend: calls from several threads at once (e.g. one per order).
            with ThreadPoolExecutor(cfg.producer_threads) as pool:
                futures: list[Future[None]] = []
                paced(n, cfg.rate, lambda a, b: futures.append(pool.submit(send, a, b)), batch)
                for f in futures:
                    f.result()
        finally:
            producer.close()

    label = ("ours" + ("" if len(cfg.producer_batches) == 1 else f" K={batch}")
             + ("" if method == GET else f"-{method}"))
    return System(label, cfg.n, args, env, enqueue, partner_method=method)


def naive_system(cfg: Config, svc: Services) -> System:
    from bench import naive

    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "NAIVE_BROKER_URL": svc.redis_url, "NAIVE_DATABASE_URL": svc.db_url,
           "PYTHONPATH": pythonpath}

    def args(node: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "-Q", naive.QUEUE,
                "--concurrency", str(cfg.concurrency), "-n", f"{node}@%h", "-l", "warning",
                "--without-mingle", "--without-gossip"]

    def enqueue(n: int) -> None:
        app = naive.make_app(svc.redis_url)

        def send(a: int, b: int) -> None:
            for i in range(a, b):
                app.send_task(naive.TASK, args=(naive.message(tx(i), PAYOUT, datetime.now(UTC)),),
                              queue=naive.QUEUE)
        try:
            paced(n, cfg.rate, send)
        finally:
            app.close()

    return System("naive", cfg.naive_n, args, env, enqueue)


def updated(i: int, share: float) -> bool:
    """Whether conversion i gets a later status change (spread evenly, floor(n * share))."""
    return int((i + 1) * share) != int(i * share)


def updates_system(cfg: Config, svc: Services, share: float) -> System:
    """Ours, with `share` of the conversions first reported `pending` and approved by a later
    event (sent after every first event, as an advertiser's update): the same N postbacks,
    N * (1 + share) events through intake."""
    base = ours_system(cfg, svc)

    def enqueue(n: int) -> None:
        producer = Producer(Settings.from_env(base.worker_env))
        try:
            paced(n, cfg.rate, lambda a, b: producer.send_conversions(
                [{"transaction_id": tx(i), "payout": PAYOUT,
                  "status": "pending" if updated(i, share) else "approved"}
                 for i in range(a, b)]))
            later = [i for i in range(n) if updated(i, share)]
            for start in range(0, len(later), BATCH):
                producer.send_conversions([{"transaction_id": tx(i), "payout": PAYOUT,
                                            "status": "approved"}
                                           for i in later[start:start + BATCH]])
        finally:
            producer.close()

    return System(f"ours+{share:.0%} updates", cfg.n, base.worker_args, base.worker_env,
                  enqueue)


def ceiling_system(cfg: Config) -> System:
    """The same delivery transport firing the same N requests at the same partner, in this
    process, with no database or queue: the most the pipeline could deliver."""
    return System("ceiling", cfg.n, lambda node: [], {}, lambda n: None)


def run_ceiling(cfg: Config, partner: Partner, run_no: int) -> dict[str, Any]:
    from postback_worker.delivery.sender import PostbackRequest, Sender

    settings = Settings.build(allow_networks=LOOPBACK)
    partner.reset()
    requests = [PostbackRequest(postback_id=f"pb_{i}", url=partner.base_url + PATH_QS.format(
        transaction_id=tx(i), payout=PAYOUT, postback_id=f"pb_{i}")) for i in range(cfg.n)]
    with Sender(concurrency=settings.delivery.concurrency,
                allow_networks=settings.delivery.allow_networks) as sender:
        m0 = time.monotonic()
        outcomes = sender.send_many(requests)
        span = time.monotonic() - m0
    count = partner.count()
    ok = count == cfg.n and all(o.status_code == 200 for o in outcomes)
    result = {"run": run_no, "n": cfg.n, "postbacks_per_s": round(cfg.n / span, 1),
              "seconds_first_enqueue_to_last_delivery": round(span, 3),
              "partner_requests": count, "checks": {"partner_requests == N, all 200": ok},
              "ok": ok}
    log(f"ceiling run {run_no}: {result['postbacks_per_s']} requests/s")
    return result


def run_once(system: System, cfg: Config, svc: Services, partner: Partner, tmp: Path,
             run_no: int) -> dict[str, Any]:
    reset_state(svc)
    partner.reset()
    tag = secrets.token_hex(3)
    names = [f"{system.label}{i}-{tag}" for i in range(cfg.workers)]
    procs: list[Proc] = []
    try:
        for name in names:
            procs.append(Proc(name, system.worker_args(name), system.worker_env,
                              tmp / f"{name}.log"))
        ready_s = wait_ready(svc.redis_url, names, procs, READY_TIMEOUT)
        with RssSampler([p.pid for p in procs]) as rss:
            t0 = datetime.now(UTC)
            m0 = time.monotonic()
            system.enqueue(system.n)
            enqueue_s = time.monotonic() - m0
            wait_delivered(svc, system.n, procs, cfg.timeout, cfg.stall)
            detect_s = time.monotonic() - m0
            rss.sample()
        fig = figures(svc, t0)
        # The partner may still be answering the last requests' keep-alive reads; the count is
        # taken after every postback is recorded, so it is final.
        partner_count = partner.count()
        states = state_summary(svc)
    finally:
        for p in procs:
            p.stop()
    errors_in_logs = [p.name for p in procs if "Traceback" in p.tail(10_000)]
    for p in procs:
        tail = p.tail(10_000)
        if "Traceback" in tail:
            log(f"{p.name}: {tail[tail.rindex('Traceback'):][-1500:]}")
    checks = {
        "attempts_rows == N": fig["attempts_rows"] == system.n,
        "partner_requests == N": partner_count == system.n,
        "delivered == N": fig["delivered"] == system.n,
        f"conversions all {system.expected_conversion_state}":
            states["conversions"].get(system.expected_conversion_state, 0) == system.n,
        "no tracebacks in worker logs": not errors_in_logs,
    }
    result = {
        "run": run_no, "n": system.n, **fig, "partner_requests": partner_count,
        "enqueue_s": round(enqueue_s, 3), "done_detected_s": round(detect_s, 3),
        "worker_ready_s": round(ready_s, 2),
        "rss_max_proc_mb": round(rss.max_proc / 2**20, 1),
        "rss_sum_mb": round(rss.max_sum / 2**20, 1), "rss_samples": rss.samples,
        "states": states, "checks": checks, "ok": all(checks.values()),
    }
    log(f"{system.label} run {run_no}: {result['postbacks_per_s']} postbacks/s, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
        f"RSS max {result['rss_max_proc_mb']} MB / sum {result['rss_sum_mb']} MB"
        + ("" if result["ok"] else f"  CHECKS FAILED: "
           f"{[k for k, v in checks.items() if not v]}"))
    return result


# ---------------------------------------------------------------------------------------------
# report

FIGURES = [
    ("postbacks/s", "postbacks_per_s", "{:.0f}"),
    ("p50 ingest->delivery (ms)", "p50_ms", "{:.0f}"),
    ("p99 ingest->delivery (ms)", "p99_ms", "{:.0f}"),
    ("peak worker RSS, max proc (MB)", "rss_max_proc_mb", "{:.1f}"),
    ("peak worker RSS, sum (MB)", "rss_sum_mb", "{:.1f}"),
    ("first enqueue->last delivery (s)", "seconds_first_enqueue_to_last_delivery", "{:.2f}"),
    ("enqueue time (s)", "enqueue_s", "{:.2f}"),
]


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for _, key, _ in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "postback_worker"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return commit + (" (+ uncommitted changes in postback_worker/)" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(meta: dict[str, Any], systems: list[System]) -> dict[str, Any]:
    med = {s.label: medians(s.runs) for s in systems}
    labels = [s.label for s in systems]
    ours = [lb for lb in labels if lb.startswith("ours")]
    ratios: dict[str, dict[str, float]] = {}
    if "naive" in med:
        for lb in ours:
            ratios[f"{lb} / naive"] = {
                key: round(med[lb][key] / med["naive"][key], 2)
                for _, key, _ in FIGURES
                if med[lb].get(key) is not None and med["naive"].get(key)}
    w = 34
    lines = []
    lines.append(f"postback-worker end-to-end benchmark — commit {meta['commit']}")
    lines.append(f"machine: {meta['machine']}")
    lines.append(f"N ours = {meta['n_ours']}, N naive = {meta['n_naive']}, runs = {meta['runs']}, "
                 f"W = {meta['workers']} worker process(es) x C = {meta['concurrency']} "
                 f"(prefork), partner: {meta['partner']}, producer batch (events per "
                 f"send_conversions call) = {meta['producer_batches']} from "
                 f"{meta['producer_threads']} thread(s)")
    ns = {s.n for s in systems if s.label != "ceiling"}
    if len(ns) > 1:
        lines.append(
            f"note: the systems process different N ({sorted(ns)}); rates are comparable, "
            "latencies are not (all conversions are enqueued at once, so latency grows with "
            "N / rate).")
    lines.append("")
    header = f"{'figure (median)':<{w}} " + " ".join(f"{lb:>13}" for lb in labels)
    lines.append(header)
    lines.append("-" * len(header))
    for title, key, fmt in FIGURES:
        cells = [med[lb].get(key) for lb in labels]
        if all(c is None for c in cells):
            continue
        lines.append(f"{title:<{w}} " + " ".join(
            f"{(fmt.format(c) if c is not None else '-'):>13}" for c in cells))
    lines.append("")
    for s in systems:
        lines.append(f"{s.label} per run:")
        for r in s.runs:
            if s.label == "ceiling":
                lines.append(f"  run {r['run']}: N={r['n']} {r['postbacks_per_s']:.0f} requests/s "
                             f"in {r['seconds_first_enqueue_to_last_delivery']:.2f} s, partner "
                             f"{r['partner_requests']}, checks "
                             + ("ok" if r["ok"] else "FAILED"))
                continue
            lines.append(
                f"  run {r['run']}: N={r['n']} {r['postbacks_per_s']:.0f} postbacks/s, "
                f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms, "
                f"first->last {r['seconds_first_enqueue_to_last_delivery']:.2f} s, "
                f"enqueue {r['enqueue_s']:.2f} s, RSS max {r['rss_max_proc_mb']:.1f} MB / "
                f"sum {r['rss_sum_mb']:.1f} MB, attempts {r['attempts_rows']}, "
                f"partner {r['partner_requests']}, checks "
                + ("ok" if r["ok"] else
                   "FAILED: " + ", ".join(k for k, v in r["checks"].items() if not v)))
    rate = {lb: med[lb].get("postbacks_per_s") for lb in labels}
    summary = []
    for lb in ours:
        if rate.get("naive"):
            summary.append(f"{lb} / naive postbacks/s: {rate[lb] / rate['naive']:.1f}x")
        if rate.get("ceiling"):
            share = 100 * rate[lb] / rate["ceiling"]
            summary.append(f"{lb} as a share of the ceiling: {share:.0f}%")
    if len(ours) > 1:
        best = max(ours, key=lambda lb: int(lb.split("=")[1]))
        for lb in ours:
            if lb != best and rate[best]:
                summary.append(f"{lb} / {best} postbacks/s: {100 * rate[lb] / rate[best]:.0f}%")
    if summary:
        lines.append("")
        lines.extend(summary)
    get, post = (med.get("ours", {}).get("postbacks_per_s"),
                 med.get(f"ours-{POST_JSON}", {}).get("postbacks_per_s"))
    if post is not None:
        lines.append("")
        lines.append(f"ours with a POST JSON-body partner: {post:.0f} postbacks/s (median)")
    if get and post is not None:
        ratios["post_json_over_get"] = round(post / get, 3)
        lines.append(f"ratio post-json/get postbacks/s: {post / get:.2f} "
                     f"(GET {get:.0f}/s in the same run; goal >= 0.80)")
    for label in med:
        if label.startswith("ours+") and med.get("ours", {}).get("postbacks_per_s"):
            share = med[label]["postbacks_per_s"] / med["ours"]["postbacks_per_s"]
            lines.append(f"{label} / ours postbacks/s (same run): {share:.0%}")
    print("\n".join(lines), flush=True)
    return {"meta": meta,
            **{s.label: {"runs": s.runs, "median": med[s.label]} for s in systems},
            "ratios": ratios, "summary": summary}


# ---------------------------------------------------------------------------------------------
# main


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="postback-worker vs naive Celery: end-to-end")
    ap.add_argument("--conversions", "-n", type=int, default=5000,
                    help="conversions per run for ours (default 5000)")
    ap.add_argument("--naive-conversions", type=int, default=None,
                    help="conversions per run for the naive baseline (default min(N, 2000))")
    ap.add_argument("--runs", "-r", type=int, default=3)
    ap.add_argument("--workers", "-w", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--concurrency", "-c", type=int, default=2,
                    help="prefork pool size per worker (default 2)")
    ap.add_argument("--partner-delay-ms", type=float, default=0.0)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="offer conversions at this steady rate per second (the latency "
                         "scenario: --rate 500 --duration 60); default: all at once")
    ap.add_argument("--duration", type=float, default=None,
                    help="with --rate: seconds to offer load (sets --conversions)")
    ap.add_argument("--partner", choices=("auto", "python", "nginx"), default="auto",
                    help="auto: nginx if on PATH and no delay, else bench/fast_partner.py")
    ap.add_argument("--only", choices=("ours", "naive", "ceiling"))
    ap.add_argument("--producer-batch", default=str(BATCH), metavar="K[,K...]",
                    help="events per Producer.send_conversions call for ours; a comma list "
                         "runs ours once per value (e.g. 1,25,500); default 500")
    ap.add_argument("--producer-threads", type=int, default=1, metavar="T",
                    help="threads calling send_conversions at once for ours (default 1: "
                         "one call after the other)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the ceiling (the transport alone, no database or queue)")
    ap.add_argument("--partner-method", choices=(GET, POST_JSON, "both"), default=GET,
                    help="how ours fires the partner: GET (default), POST with a JSON body, or "
                         "both in this run (prints the post-json / get ratio)")
    ap.add_argument("--updates", type=float, default=0.0, metavar="FRACTION",
                    help="also run ours with this share of conversions reported pending and "
                         "approved by a later event (e.g. 0.3), in the same run")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--pg-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="server to create the scratch database on")
    ap.add_argument("--redis-url", default=os.environ.get(
        "BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
        help="Redis database used (FLUSHDB before every run)")
    ap.add_argument("--ours-app", default="postback_worker.worker.app",
                    help="Celery app module for ours (to A/B a patched build; must be importable)")
    ap.add_argument("--timeout", type=float, default=600.0, help="max seconds per run")
    ap.add_argument("--stall", type=float, default=60.0,
                    help="fail a run after this many seconds without a new delivery")
    args = ap.parse_args(argv)
    if args.duration is not None:
        if not args.rate:
            ap.error("--duration goes with --rate")
        args.conversions = int(args.rate * args.duration)
        if args.naive_conversions is None:
            args.naive_conversions = args.conversions
    if args.naive_conversions is None:
        args.naive_conversions = min(args.conversions, 2000)
    if not 0 <= args.updates < 1:
        ap.error("--updates must be a fraction from 0 to below 1, e.g. 0.3")
    try:
        args.producer_batches = tuple(int(k) for k in args.producer_batch.split(","))
    except ValueError:
        ap.error("--producer-batch takes whole numbers separated by commas, e.g. 1,25,500")
    if any(k < 1 for k in args.producer_batches):
        ap.error("--producer-batch values must be at least 1")
    for name in ("conversions", "naive_conversions", "runs", "workers", "concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Also when started in the background by a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    cfg = Config(n=args.conversions, naive_n=args.naive_conversions, runs=args.runs,
                 workers=args.workers, concurrency=args.concurrency,
                 delay_ms=args.partner_delay_ms, timeout=args.timeout, stall=args.stall,
                 ours_app=args.ours_app, rate=args.rate,
                 producer_batches=args.producer_batches,
                 producer_threads=args.producer_threads)
    if not devservices.postgres_answers(args.pg_url):
        raise BenchError(f"PostgreSQL at {args.pg_url} does not answer")
    if not devservices.redis_answers(args.redis_url):
        raise BenchError(f"Redis at {args.redis_url} does not answer")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pbw-bench-")))
        db_name, db_url = stack.enter_context(bench_database(args.pg_url))
        log(f"database {db_name}: migrating")
        upgrade(db_url)
        engine = make_engine(db_url)
        stack.callback(engine.dispose)
        svc = Services(args.pg_url, db_name, db_url, args.redis_url, Store(engine))
        partner = start_partner(args.partner, tmp, cfg.delay_ms)
        stack.callback(partner.stop)
        log(f"partner: {partner.kind} at {partner.base_url}")
        wanted = [s for s in ("ours", "naive") if args.only in (None, s)]
        n_clicks = max(cfg.n if "ours" in wanted else 0, cfg.naive_n if "naive" in wanted else 0)
        log(f"seeding 1 offer, 1 partner, {n_clicks} clicks")
        seed(svc.store, partner.base_url, n_clicks)
        stack.callback(reset_state, svc)  # leave no queued messages behind in the Redis db
        methods = [GET, POST_JSON] if args.partner_method == "both" else [args.partner_method]
        systems = []
        if "ours" in wanted:
            systems += [ours_system(cfg, svc, k, m) for m in methods
                        for k in cfg.producer_batches]
        if args.updates and "ours" in wanted:
            systems.insert(1, updates_system(cfg, svc, args.updates))
        if "naive" in wanted:
            systems.append(naive_system(cfg, svc))
        if args.only == "ceiling" or ("ours" in wanted and not args.no_ceiling):
            systems.append(ceiling_system(cfg))
        # Runs alternate between the systems (ours GET, ours post-json, naive, GET, ...), so
        # a machine that gets busier or quieter during the benchmark affects each alike.
        for run_no in range(1, cfg.runs + 1):
            for system in systems:
                configure_partner(svc.store, partner.base_url, system.partner_method)
                log(f"{system.label} run {run_no}/{cfg.runs}: N={system.n}")
                if system.label == "ceiling":
                    system.runs.append(run_ceiling(cfg, partner, run_no))
                else:
                    system.runs.append(run_once(system, cfg, svc, partner, tmp, run_no))
        meta = {
            "commit": git_commit(), "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                       f"Python {platform.python_version()}",
            "n_ours": cfg.n if "ours" in wanted else None,
            "n_naive": cfg.naive_n if "naive" in wanted else None, "runs": cfg.runs,
            "workers": cfg.workers, "concurrency": cfg.concurrency,
            "partner": partner.kind, "partner_delay_ms": cfg.delay_ms,
            "producer_batches": ",".join(map(str, cfg.producer_batches)),
            "producer_threads": cfg.producer_threads,
            "redis_url": args.redis_url,
            "ours_app": cfg.ours_app,
        }
        out = report(meta, systems)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
        ok = all(r["ok"] for s in systems for r in s.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
