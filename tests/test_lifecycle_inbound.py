"""The lifecycle with issue 14's parts: inbound caps count new conversions only (a capped
conversion's updates fire nothing), and a POST partner's body is rendered per event."""

from __future__ import annotations

import json
from datetime import timedelta

from support.helpers import NOW, Clock, add_click, add_offer, add_partner, conversion, messages
from support.partner import PartnerServer

from postback_worker.pipeline.processing import Pipeline
from postback_worker.store.repo import Store


def _state(store: Store, conversion_id: str) -> str:
    return str((store.get_conversion(conversion_id) or {})["state"])


def test_caps_count_new_conversions_and_a_capped_conversion_fires_no_update(
        pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock) -> None:
    add_offer(store, "o1", daily_cap=2)
    add_partner(store, "p1", partner.url, fire_events="approved,reversal")
    for tx in ("a", "b", "c"):
        add_click(store, tx, aff_id="p1", clicked_at=NOW - timedelta(hours=1))
    a = conversion("a", payout="10")
    pipeline.process_conversions(messages(a))
    update = conversion("a", status="reversed", payout="10", now=clock())
    pipeline.process_conversions(messages(update))
    assert _state(store, update.id) == "updated"
    # The update of a is not a conversion of its own: b still fits the cap of 2.
    b, c = conversion("b", payout="10"), conversion("c", payout="10")
    pipeline.process_conversions(messages(b, c))
    assert [_state(store, x.id) for x in (a, b, c)] == ["attributed", "attributed", "capped"]
    assert partner.count() == 3  # a approved, a reversal, b approved
    # A later event of the capped conversion is recorded but fires nothing.
    c_reversed = conversion("c", status="reversed", payout="10", now=clock())
    pipeline.process_conversions(messages(c_reversed))
    assert _state(store, c_reversed.id) == "updated"
    assert not store.postbacks_for(c.id)
    assert partner.count() == 3


def test_a_json_body_is_rendered_for_each_event(
        pipeline: Pipeline, store: Store, partner: PartnerServer, clock: Clock) -> None:
    add_offer(store, "o1")
    add_partner(store, "p1", partner.url, method="POST", body_format="json",
                fire_events="approved,reversal",
                body_template='{"click": "{transaction_id}", "event": "{event}", '
                              '"status": "{status}", "was": "{previous_status}"}')
    add_click(store, "a", aff_id="p1", clicked_at=NOW - timedelta(hours=1))
    pipeline.process_conversions(messages(conversion("a", payout="10")))
    pipeline.process_conversions(messages(
        conversion("a", status="reversed", payout="10", now=clock())))
    bodies = [json.loads(r.body) for r in partner.received()]
    assert [(b["click"], b["event"], b["status"]) for b in bodies] == [
        ("a", "approved", "approved"), ("a", "reversal", "reversed")]
    assert bodies[1]["was"] == "approved"
