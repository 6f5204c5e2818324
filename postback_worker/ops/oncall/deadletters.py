"""Dead letters: filter, list, count, show and purge (shared by the CLI and the API)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select, update

from postback_worker.domain.events import FieldError, ValidationError
from postback_worker.domain.masking import load_headers, mask_body, mask_headers, mask_url
from postback_worker.store import repo
from postback_worker.store import schema as t
from postback_worker.store.repo import Store

FAILURE_CLASSES = ("partner_5xx", "timeout", "throttled", "dns", "network", "auth", "blocked",
                   "gone", "config", "proxy")
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, now: datetime) -> datetime:
    """ISO 8601 date/time (UTC unless it says otherwise) or an age such as 30m, 6h, 7d."""
    text = value.strip()
    rel = _RELATIVE.fullmatch(text)
    if rel:
        return now - timedelta(seconds=float(rel.group(1)) * _UNITS[rel.group(2)])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be an ISO 8601 time (2026-11-26T12:00:00Z) or an age such as "
                         "30m, 6h, 7d") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@dataclass(frozen=True)
class Filter:
    """Which dead letters: every field is optional and they combine with AND."""

    partner_id: str | None = None
    offer_id: str | None = None
    failure_class: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    last_status: int | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any], now: datetime) -> Filter:
        """From CLI options or API fields; raises ValidationError naming each bad field."""
        errors: list[FieldError] = []
        known = {"partner_id", "offer_id", "failure_class", "since", "until", "last_status"}
        kw: dict[str, Any] = {}
        for name in ("partner_id", "offer_id"):
            value = data.get(name)
            if value not in (None, ""):
                kw[name] = str(value)
        fc = data.get("failure_class")
        if fc not in (None, ""):
            if fc not in FAILURE_CLASSES:
                errors.append(FieldError("failure_class",
                                         "must be one of " + ", ".join(FAILURE_CLASSES)))
            kw["failure_class"] = fc
        for name in ("since", "until"):
            value = data.get(name)
            if value in (None, ""):
                continue
            try:
                kw[name] = value if isinstance(value, datetime) else parse_time(str(value), now)
            except ValueError as exc:
                errors.append(FieldError(name, str(exc)))
        status = data.get("last_status")
        if status not in (None, ""):
            try:
                kw["last_status"] = int(status)
                if not 100 <= kw["last_status"] <= 599:
                    raise ValueError
            except (TypeError, ValueError):
                errors.append(FieldError("last_status", "must be an HTTP status code (100-599)"))
        if kw.get("since") and kw.get("until") and kw["since"] > kw["until"]:
            errors.append(FieldError("until", "must be after since"))
        errors.extend(FieldError(k, "unknown field") for k in data if k not in known)
        if errors:
            raise ValidationError(errors)
        return cls(**kw)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        parts = [f"{k}={v.isoformat() if isinstance(v, datetime) else v}"
                 for k, v in self.as_dict().items()]
        return ", ".join(parts) or "all dead letters"

    def clause(self) -> Any:
        """SQL condition over dead_letters (dl) joined with postbacks (still dead)."""
        dl = t.dead_letters.c
        cond = [t.postbacks.c.state == repo.DEAD_LETTERED]
        if self.partner_id:
            cond.append(dl.partner_id == self.partner_id)
        if self.offer_id:
            cond.append(dl.offer_id == self.offer_id)
        if self.failure_class:
            cond.append(dl.failure_class == self.failure_class)
        if self.since:
            cond.append(dl.created_at >= self.since)
        if self.until:
            cond.append(dl.created_at <= self.until)
        if self.last_status is not None:
            cond.append(dl.last_status == self.last_status)
        return and_(*cond)


DEAD_JOIN = t.dead_letters.join(t.postbacks, t.postbacks.c.id == t.dead_letters.c.postback_id)
COLUMNS = ["postback_id", "partner_id", "offer_id", "failure_class", "last_status", "attempts",
           "created_at", "replay_count", "conversion_id", "url", "reason"]


def list_dead_letters(store: Store, filt: Filter, *, limit: int = 50,
                      offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """A page of dead letters (newest first) and the total matching."""
    dl, pb = t.dead_letters.c, t.postbacks.c
    stmt = (
        select(dl.postback_id, dl.partner_id, dl.offer_id, dl.failure_class, dl.last_status,
               dl.attempts, dl.created_at, dl.replay_count, dl.replayed_at, dl.reason,
               pb.conversion_id, pb.url)
        .select_from(DEAD_JOIN).where(filt.clause())
        .order_by(dl.created_at.desc(), dl.postback_id).limit(limit).offset(offset)
    )
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(stmt).mappings()]
        total = conn.execute(
            select(func.count()).select_from(DEAD_JOIN).where(filt.clause())).scalar()
    for r in rows:
        r["url"] = mask_url(r["url"])
    return rows, int(total or 0)


def stats(store: Store, filt: Filter) -> dict[str, Any]:
    """Counts by failure class, by partner, by (partner, class) and by last status."""
    dl = t.dead_letters.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(dl.partner_id, dl.failure_class, dl.last_status, func.count())
            .select_from(DEAD_JOIN).where(filt.clause())
            .group_by(dl.partner_id, dl.failure_class, dl.last_status)
        ).all()
    by_class: dict[str, int] = {}
    by_partner: dict[str, int] = {}
    by_status: dict[str, int] = {}
    pairs: dict[tuple[str, str], int] = {}
    for partner_id, failure_class, status, n in rows:
        n = int(n)
        by_class[failure_class] = by_class.get(failure_class, 0) + n
        by_partner[partner_id] = by_partner.get(partner_id, 0) + n
        key = "none" if status is None else str(status)
        by_status[key] = by_status.get(key, 0) + n
        pairs[(partner_id, failure_class)] = pairs.get((partner_id, failure_class), 0) + n
    return {
        "total": sum(by_class.values()),
        "by_class": dict(sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_partner": dict(sorted(by_partner.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_status": dict(sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_partner_and_class": [
            {"partner_id": p, "failure_class": c, "count": n}
            for (p, c), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }


def show(store: Store, postback_id: str) -> dict[str, Any] | None:
    """One postback with its dead letter (if any) and every attempt; URLs and bodies masked,
    the partner's custom headers by name only."""
    with store.engine.connect() as conn:
        pb = conn.execute(select(t.postbacks).where(t.postbacks.c.id == postback_id)
                          ).mappings().first()
        if pb is None:
            return None
        dead = conn.execute(select(t.dead_letters).where(
            t.dead_letters.c.postback_id == postback_id)).mappings().first()
    postback = {k: v for k, v in pb.items() if k not in {"lease_token"}}
    postback["url"] = mask_url(pb["url"])
    partner = store.get_partner(pb["partner_id"]) or {}
    body_format = partner.get("body_format") or ("form" if pb["method"] == "POST" else None)
    postback["body"] = mask_body(pb.get("body"), body_format)
    postback["body_format"] = body_format if pb.get("body") else None
    postback["headers"] = mask_headers(load_headers(partner.get("custom_headers")))
    postback["signature_scheme"] = (partner.get("signature_scheme") or "hmac"
                                    if partner.get("hmac_secret") else None)
    attempts = [{k: v for k, v in a.items() if k != "postback_id"}
                for a in store.attempts_for([postback_id])]
    return {"postback": postback, "dead_letter": dict(dead) if dead else None,
            "attempts": attempts}


def purge(store: Store, filt: Filter, who: str, now: datetime) -> int:
    """Delete matching dead letters (their postbacks stay dead_lettered, marked purged)."""
    dl = t.dead_letters.c
    with store.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(select(dl.postback_id).select_from(DEAD_JOIN)
                                          .where(filt.clause()))]
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            conn.execute(delete(t.dead_letters).where(dl.postback_id.in_(part)))
            conn.execute(update(t.postbacks).where(t.postbacks.c.id.in_(part))
                         .values(triggered_by=f"dead letter purged by {who}"[:200],
                                 updated_at=now))
    return len(ids)
