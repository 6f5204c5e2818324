"""A worker host cut off from the network mid-batch: its batch goes to the other host.

Two hosts (network namespaces); PostgreSQL, Redis and the partner on this machine, reached over
the bridge. Host A takes the only message and starts firing; then its link goes down (packets
dropped, no resets: as when a machine falls off the network). Host B finishes the batch from
PostgreSQL: beat's sweep hands it the postbacks whose leases ran out (the intake wake-up A
took carried no state). Needs root and iproute2.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from support.faults import (
    Cluster,
    TestNetwork,
    netns_unavailable,
    postback_states,
    unfinished,
)
from support.helpers import add_click, add_offer, add_partner
from support.partner import PartnerServer

from postback_worker.producer import Producer
from postback_worker.settings import Settings
from postback_worker.store.db import make_engine
from postback_worker.store.repo import Store

pytestmark = pytest.mark.e2e
NETNS = netns_unavailable()
UA_A, UA_B = "postback-worker/test host-a", "postback-worker/test host-b"


@pytest.fixture()
def network() -> Iterator[TestNetwork]:
    if NETNS:
        pytest.skip(NETNS)
    with TestNetwork() as net:
        net.add_host("host-a")
        net.add_host("host-b")
        yield net


def test_host_cut_off_mid_batch(network: TestNetwork, settings: Settings,
                                tmp_path: Path) -> None:
    s = settings.with_overrides(
        allow_networks=(*settings.delivery.allow_networks, network.subnet),
        visibility_timeout=4, lease_seconds=5, delivery_concurrency=4)
    with Cluster(tmp_path / "cluster", s, network=network) as cluster, \
            PartnerServer(host=network.gateway) as partner:
        store = Store(make_engine(cluster.settings.database.url))
        add_offer(store, "o1")
        add_partner(store, "p1", partner.url)
        txs = [f"tx{i:03d}" for i in range(40)]
        for tx in txs:
            add_click(store, tx)
        partner.set_response(status=200, delay=0.3)
        worker_a = cluster.worker("wa", host="host-a", user_agent=UA_A)
        producer = Producer(cluster.settings)
        try:
            ids = producer.send_conversions([{"transaction_id": tx} for tx in txs])
        finally:
            producer.close()

        def sent_by(ua: str) -> list[str]:
            return [r.header("X-Postback-Id") or "" for r in partner.received()
                    if r.header("User-Agent") == ua]

        wait_until(lambda: len(sent_by(UA_A)) >= 8, 60, message="host A to start firing")
        network.cut("host-a")
        cut_at = time.time()
        worker_b = cluster.worker("wb", host="host-b", user_agent=UA_B)
        cluster.beat(host="host-b")
        wait_until(lambda: unfinished(store.engine, ids) == 0, 120,
                   message="host B to finish host A's batch")
        worker_a.kill()

        states = postback_states(store.engine, ids)
        assert len(states) == 40 and set(states.values()) == {"delivered"}
        counts = Counter(partner.postback_ids())
        assert set(counts) == set(states)
        from_a = set(sent_by(UA_A))
        # Nothing left host A once it was cut off.
        assert all(r.at < cut_at + 1.0 for r in partner.received()
                   if r.header("User-Agent") == UA_A)
        # Postbacks A had not fired were fired once, by B; only A's in-flight ones twice.
        twice = {pid for pid, n in counts.items() if n > 1}
        assert twice <= from_a, twice - from_a
        assert set(sent_by(UA_B)) >= set(states) - from_a
        assert max(counts.values()) <= 2
        # B got the batch from PostgreSQL: the sweep queued A's expired claims for delivery.
        assert "Task postback_worker.deliver_postbacks[" in worker_b.output()
        store.engine.dispose()
