"""Two worker hosts (network namespaces with their own addresses) share the same queues.

Short form of `bench/scaleout.py`: PostgreSQL, Redis and the partner are reached over the
namespaces' bridge, not loopback. Needs root and iproute2 (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from support.faults import TestNetwork, netns_unavailable
from support.partner import PartnerServer

from postback_worker.settings import Settings

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
NETNS = netns_unavailable()


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scaleout", ROOT / "bench" / "scaleout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def network() -> Iterator[TestNetwork]:
    if NETNS:
        pytest.skip(NETNS)
    with TestNetwork() as net:
        net.add_host("host1")
        net.add_host("host2")
        yield net


@pytest.fixture()
def partner_on_bridge(network: TestNetwork) -> Iterator[PartnerServer]:
    with PartnerServer(host=network.gateway) as server:
        yield server


def _settings(settings: Settings, network: TestNetwork) -> Settings:
    # The bench's partner keeps the default 10 s timeout: a worker needs a lease of at least
    # twice that to start.
    # Claim batches of 50 for 200 events: a full batch wakes another worker, so both hosts
    # get a share (with the default 500 one batch would take them all).
    return settings.with_overrides(
        allow_networks=(*settings.delivery.allow_networks, network.subnet),
        visibility_timeout=60, config_cache_seconds=5.0, lease_seconds=20,
        ingest_claim_batch=50)


def test_two_hosts_share_the_work_and_deliver_each_postback_once(
        network: TestNetwork, partner_on_bridge: PartnerServer, settings: Settings,
        tmp_path: Path) -> None:
    bench = _bench()
    one = bench.run_scaleout(network, ["host1"], partner_on_bridge.url, tmp_path / "one",
                             _settings(settings, network), 200, chunk=25, timeout=120)
    partner_on_bridge.reset()
    two = bench.run_scaleout(network, ["host1", "host2"], partner_on_bridge.url,
                             tmp_path / "two", _settings(settings, network), 200, chunk=25,
                             timeout=120)
    print(f"\n{one.line()}\n{two.line()}")
    assert one.per_host == {"host1": 200}
    assert set(two.states.values()) == {"delivered"} and len(two.states) == 200
    # Every postback fired once, recorded once; both hosts did part of the work.
    assert Counter(partner_on_bridge.postback_ids()) == Counter(two.states.keys())
    assert set(two.attempts.values()) == {1}
    assert set(two.per_host) == {"host1", "host2"}
    assert all(n > 0 for n in two.per_host.values())
    assert sum(two.per_host.values()) == 200


def test_partner_rate_limit_holds_across_hosts(
        network: TestNetwork, partner_on_bridge: PartnerServer, settings: Settings,
        tmp_path: Path) -> None:
    pytest.importorskip("postback_worker.pipeline.guardrails")
    rate, n = 20.0, 80
    bench = _bench()
    # rate_limit is set on the partner row (what `partners add --rate-limit` stores).
    # Claim batches of 10: each full batch wakes the other host, so both take events at once
    # and fire from the same bucket. (Deferred postbacks come back through the sweep, whose
    # delivery task tends to land on whichever host is not sweeping: alone they could all go
    # to one host.)
    result = bench.run_scaleout(network, ["host1", "host2"], partner_on_bridge.url, tmp_path,
                                _settings(settings, network).with_overrides(
                                    guard_wait=0.2, ingest_claim_batch=10),
                                n, chunk=10, timeout=180,
                                partner_extra={}, partner_rate_limit=rate)
    print(f"\n{result.line()}")
    assert set(result.states.values()) == {"delivered"} and len(result.states) == n
    assert set(result.per_host) == {"host1", "host2"}
    times = sorted(r.at for r in partner_on_bridge.received())
    assert len(times) == n
    # A token bucket of one second's worth: at most rate * (1 + w) requests in any w seconds,
    # whichever host sent them (a little slack for the partner's own clock reading).
    for w in (0.5, 1.0, 2.0):
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - w:
                j += 1
            assert i - j + 1 <= rate * (1 + w) + 2, (w, i - j + 1)
    assert times[-1] - times[0] >= (n - rate) / rate - 0.5
