"""PostgreSQL restarted in the middle of a run: workers and the API ride through.

Runs against a dedicated PostgreSQL and Redis started for the test (never the shared ones).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn
from conftest import ADMIN, wait_until
from support.faults import Cluster, postback_states, unfinished
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.api.app import create_app
from postback_worker.dev.services import free_port
from postback_worker.settings import Settings
from postback_worker.store.db import make_engine
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e


@pytest.fixture()
def cluster(settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    # Long enough that Celery's retry countdowns (held by the worker) are not redelivered.
    with Cluster(tmp_path / "cluster", settings.with_overrides(visibility_timeout=60)) as c:
        yield c


def serve_api(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, message="uvicorn to start")
    return f"http://127.0.0.1:{port}", server, thread


def test_postgres_restart_mid_run(cluster: Cluster, partner: PartnerServer) -> None:
    s = cluster.settings
    store = Store(make_engine(s.database.url))
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    txs = [f"tx{i:03d}" for i in range(60)]
    for tx in txs:
        add_click(store, tx)
    partner.set_response(status=200, delay=0.05)
    worker = cluster.worker("w1", concurrency=2, delivery_concurrency=4)
    cluster.beat()
    api, server, thread = serve_api(s)
    http = requests.Session()
    http.headers.update(ADMIN)
    events = [{"id": f"cv{i:03d}", "transaction_id": tx} for i, tx in enumerate(txs)]
    try:
        first = http.post(f"{api}/v1/conversions", json=events[:30], timeout=10)
        assert first.status_code == 202, first.text
        wait_until(lambda: partner.count() >= 5, 60, message="the first deliveries")

        # Claimed by the running batch and not yet recorded: "in flight at the fault".
        in_flight = {pid for pid, state in postback_states(store.engine, [
            e["id"] for e in events[:30]]).items() if state == "in_flight"}
        cluster.postgres.stop("fast")
        # What needs the database is refused with 503 + Retry-After, never half-accepted.
        click = http.post(f"{api}/v1/clicks", json={"offer_id": "o1", "aff_id": "p1"},
                          timeout=30)
        assert click.status_code == 503, click.text
        assert click.headers["Retry-After"] == "5"
        assert click.json()["error"] == (
            "the database is unavailable; nothing was accepted, retry later")
        lookup = http.get(f"{api}/v1/conversions/cv000", timeout=30)
        assert lookup.status_code == 503
        # Acknowledged means durable: conversions are refused too, nothing is half-accepted.
        refused = http.post(f"{api}/v1/conversions", json=events[30:], timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["error"] == (
            "the database is unavailable; nothing was accepted, retry later")
        # The worker retries its task (logged, with backoff) instead of failing it.
        wait_until(lambda: "OperationalError" in worker.output() and "Retry in" in
                   worker.output(), 60, message="the worker to log a database retry")
        cluster.postgres.start()
        # The client resends what was refused (same ids) once the API accepts again.
        wait_until(lambda: http.post(f"{api}/v1/conversions", json=events[30:],
                                     timeout=10).status_code == 202,
                   60, interval=0.5, message="the API to accept conversions again")

        ids = [e["id"] for e in events]
        wait_until(lambda: unfinished(store.engine, ids) == 0, 120,
                   message="every conversion to end after the restart")
        again = http.post(f"{api}/v1/clicks", json={"offer_id": "o1", "aff_id": "p1"},
                          timeout=10)
        assert again.status_code == 201, again.text
    finally:
        server.should_exit = True
        thread.join(10)

    states = postback_states(store.engine, ids)
    assert len(states) == 60 and set(states.values()) == {"delivered"}
    counts = Counter(partner.postback_ids())
    assert set(counts) == set(states)
    twice = {pid for pid, n in counts.items() if n > 1}
    # Only postbacks in flight when the database went away may be fired again.
    assert twice <= in_flight, twice - in_flight
    assert max(counts.values()) <= 2
    assert worker.alive, "the worker must ride through, not exit"
    assert worker.output().count("Worker exited prematurely") == 0
    store.engine.dispose()
