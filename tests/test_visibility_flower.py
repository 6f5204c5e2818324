"""Flower, started the way the Procfile starts it (`postback-worker flower`), with basic auth,
answering its documented HTTP API about a running worker and the postback queues."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import Proc, wait_until
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.cli import main
from postback_worker.dev.services import free_port
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e
AUTH = ("ops", "s3cret-flower")


def get_json(url: str, auth: tuple[str, str] | None = AUTH) -> object:
    r = requests.get(url, auth=auth, timeout=10)
    r.raise_for_status()
    return r.json()


def start_flower(settings: Settings, tmp_path: Path) -> tuple[Proc, str]:
    """`postback-worker flower` with basic auth, answering; the process and its base URL."""
    port = free_port()
    env = {**os.environ, **settings.to_env(),
           "POSTBACK_FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}
    flower = Proc("flower", [sys.executable, "-m", "postback_worker.cli", "flower",
                             "--address=127.0.0.1", f"--port={port}"],
                  env, tmp_path / "flower.log").start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/healthcheck", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(up, 60, message="Flower to answer")
    except AssertionError:
        flower.stop()
        raise
    return flower, base


def test_flower_api_with_basic_auth(settings: Settings, store: Store, tmp_path: Path,
                                    celery_procs: Callable[..., Proc]) -> None:
    add_offer(store, "o1")
    celery_procs("worker", name="flowerw")
    flower, base = start_flower(settings, tmp_path)
    try:
        # Authentication is on: the API and the UI refuse anonymous and wrong credentials.
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=("ops", "nope"),
                            timeout=10).status_code == 401
        assert requests.get(f"{base}/", timeout=10).status_code == 401
        worker = f"flowerw@{socket.gethostname()}"

        def workers() -> object:
            data = get_json(f"{base}/api/workers?refresh=1")
            return data if isinstance(data, dict) and worker in data else None

        data = wait_until(workers, 60, interval=0.5, message="Flower to see the worker")
        queues = {q["name"] for q in data[worker]["active_queues"]}
        assert queues == {"conversions", "retries", "replay", "maintenance"}
        ids = Producer(settings).send_conversions([{"transaction_id": "tx-unknown",
                                                    "offer_id": "o1"}])

        def task_seen() -> object:
            tasks = get_json(f"{base}/api/tasks")
            assert isinstance(tasks, dict)
            # The intake wake-up the producer sent (it names the events it was sent for).
            done = [t for t in tasks.values() if t["name"] == "postback_worker.intake"
                    and t["state"] == "SUCCESS" and ids[0] in t["args"]]
            return done or None

        (task,) = wait_until(task_seen, 60, interval=0.5, message="the task in Flower")
        assert task["worker"] == worker
        assert store.get_conversion(ids[0])["state"] == "unknown_click"  # type: ignore[index]
        lengths = get_json(f"{base}/api/queues/length")
        assert isinstance(lengths, dict)
        assert {q["name"]: q["messages"] for q in lengths["active_queues"]} == {
            "conversions": 0, "retries": 0, "replay": 0, "maintenance": 0}
    finally:
        flower.stop()
    assert AUTH[1] not in " ".join(flower.args)  # the password is never on the command line


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["flower"], {}, "error: Flower needs authentication: set POSTBACK_FLOWER_BASIC_AUTH"),
        (["flower", "--dev"], {}, "error: --dev without authentication listens on loopback "
                                  "only, not 0.0.0.0"),
        (["flower"], {"POSTBACK_FLOWER_BASIC_AUTH": "justuser"}, "user:password pairs"),
    ],
)
def test_flower_cli_refuses_to_run_open(settings: Settings, args: list[str],
                                        env: dict[str, str], message: str) -> None:
    base = {k: v for k, v in settings.to_env().items() if not k.startswith("POSTBACK_FLOWER")}
    out = CliRunner().invoke(main, args, env={**base, "FLOWER_BASIC_AUTH": "", **env})
    assert out.exit_code == 2 and message in out.stderr


def test_periodic_maintenance_stays_out_of_flowers_task_list(
    settings: Settings, store: Store, tmp_path: Path, partner: PartnerServer,
    celery_procs: Callable[..., Proc],
) -> None:
    """Beat sweeps every 0.2 s here; Flower lists the real work (intake, the retry's delivery)
    and none of the sweeps, and the retry still goes out through the sweep."""
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    add_click(store, "tx-1", aff_id="p1")
    partner.route("/pb", 503)
    celery_procs("worker", name="quietw")
    beat = celery_procs("beat")
    flower, base = start_flower(settings, tmp_path)
    try:
        wait_until(lambda: get_json(f"{base}/api/workers?refresh=1"), 60, interval=0.5,
                   message="Flower to see the worker")
        (cid,) = Producer(settings).send_conversions([{"transaction_id": "tx-1"}])
        wait_until(lambda: partner.count() >= 1, 60, message="the first attempt (503)")
        partner.route("/pb", 200)

        def delivered() -> bool:
            return [p["state"] for p in store.postbacks_for(cid)] == ["delivered"]

        wait_until(delivered, 60, message="the retry, queued by the sweep, to be delivered")

        def names() -> object:
            tasks = get_json(f"{base}/api/tasks")
            assert isinstance(tasks, dict)
            seen = {t["name"] for t in tasks.values()}
            return seen if "postback_worker.deliver_postbacks" in seen else None

        wait_until(lambda: beat.output().count("(postback_worker.sweep)") >= 10, 30,
                   interval=0.2, message="beat to send ten sweeps")
        seen = wait_until(names, 30, interval=0.5, message="the retry's task in Flower")
        assert {"postback_worker.intake", "postback_worker.deliver_postbacks"} <= seen
        quiet = {"postback_worker.sweep", "postback_worker.requeue_stuck_conversions",
                 "postback_worker.compact_rollups"}
        assert seen & quiet == set(), seen
    finally:
        flower.stop()
