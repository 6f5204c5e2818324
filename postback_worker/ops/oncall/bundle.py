"""Support bundle: everything a partner or provider needs about one partner and time range.

Files: SUMMARY.txt (plain words, the most likely of the six causes), ids.csv, counts.json,
attempts_sample.csv, partner.json, config_history.json, offers.json, egress_ips.txt.
Secrets never enter it: URLs go through `mask_url`, the partner's HMAC secret is dropped.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from postback_worker.domain.diagnosis import diagnose
from postback_worker.domain.failures import FACTS, FailureClass
from postback_worker.domain.masking import mask_url
from postback_worker.domain.postback import PostbackState
from postback_worker.errors import UnknownPartner
from postback_worker.settings import Settings
from postback_worker.store import repo
from postback_worker.store.repo import Store

SAMPLES_PER_CLASS = 10


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return "" if value is None else str(value)


def redact(row: dict[str, Any]) -> dict[str, Any]:
    """A partner (or snapshot) with secrets dropped and URL tokens masked."""
    return repo.redacted_config(row)


def collect(store: Store, settings: Settings, partner_id: str, since: datetime,
            until: datetime, now: datetime) -> dict[str, str]:
    """The bundle's files (name -> text)."""
    partner = store.get_partner(partner_id)
    if partner is None:
        raise UnknownPartner(partner_id)
    evidence = store.partner_evidence(partner_id, since, until)
    postbacks, expired = evidence["postbacks"], evidence["expired"]
    attempts, history = evidence["attempts"], evidence["history"]
    offer_ids = sorted({p["offer_id"] for p in postbacks if p["offer_id"]}
                       | {c["offer_id"] for c in expired if c["offer_id"]})
    offers = [o for o in store.list_offers() if o["id"] in offer_ids]

    undelivered = [p for p in postbacks if p["state"] != PostbackState.DELIVERED]
    failed = Counter((p["last_class"], p["last_status"]) for p in undelivered
                     if p["last_class"] and p["last_class"] != FailureClass.DELIVERED)
    diagnosis = diagnose(failed, len(expired))
    counts = {
        "postbacks": len(postbacks),
        "by_state": dict(Counter(p["state"] for p in postbacks)),
        "undelivered_by_class": dict(Counter(p["last_class"] or "none" for p in undelivered)),
        "failed_attempts_by_class": dict(Counter(a["failure_class"] for a in attempts)),
        "failed_attempts_by_status": dict(Counter(str(a["status_code"]) for a in attempts)),
        "expired_click_conversions": len(expired),
        "most_likely_cause": diagnosis.cause,
        "evidence": diagnosis.evidence,
    }
    files = {
        "SUMMARY.txt": _summary(partner, since, until, now, counts, diagnosis.summary(),
                                settings.delivery.egress_ips),
        "counts.json": json.dumps(counts, indent=2, sort_keys=True),
        "ids.csv": _ids_csv(undelivered, expired),
        "attempts_sample.csv": _attempts_csv(_sample(attempts)),
        "partner.json": json.dumps(redact(partner), indent=2, default=_iso),
        "config_history.json": json.dumps(
            [{**h, "snapshot": _redact_snapshot(h["snapshot"])} for h in history],
            indent=2, default=_iso),
        "offers.json": json.dumps(
            [{k: o[k] for k in ("id", "name", "campaign_type", "lifespan_days", "updated_at")}
             for o in offers], indent=2, default=_iso),
        "egress_ips.txt": "\n".join(ips) + "\n" if (ips := settings.delivery.egress_ips) else
        "(no egress IPs configured: set POSTBACK_EGRESS_IPS)\n",
    }
    return files


def _redact_snapshot(snapshot: str) -> Any:
    try:
        data = json.loads(snapshot)
    except ValueError:
        return "(unreadable snapshot)"
    return redact(data) if isinstance(data, dict) else data


def _sample(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: Counter[str] = Counter()
    out = []
    for a in attempts:  # newest first
        if seen[a["failure_class"]] < SAMPLES_PER_CLASS:
            seen[a["failure_class"]] += 1
            out.append({**a, "url": mask_url(a["url"])})
    return out


def _ids_csv(undelivered: list[dict[str, Any]], expired: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "conversion_id", "transaction_id", "postback_id", "state",
                "failure_class", "last_status", "attempts", "reason"])
    for p in undelivered:
        w.writerow(["postback", p["conversion_id"], p["transaction_id"], p["id"], p["state"],
                    p["last_class"] or "", p["last_status"] or "", p["attempts"],
                    p["reason"] or ""])
    for c in expired:
        w.writerow(["conversion", c["id"], c["transaction_id"], "", c["state"], "", "", "",
                    c["reason"] or ""])
    return buf.getvalue()


def _attempts_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["postback_id", "attempt_no", "started_at", "duration_ms", "status_code",
            "failure_class", "error", "response_excerpt", "url"]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([_iso(r[c]) for c in cols])
    return buf.getvalue()


def _summary(partner: dict[str, Any], since: datetime, until: datetime, now: datetime,
             counts: dict[str, Any], diagnosis: str, egress: tuple[str, ...]) -> str:
    by_state = ", ".join(f"{k} {v}" for k, v in sorted(counts["by_state"].items())) or "none"
    lines = [
        f"Support bundle for partner {partner['id']} ({partner['name']})",
        f"Time range: {_iso(since)} to {_iso(until)} (UTC); made {_iso(now)}",
        "",
        diagnosis,
        "",
        f"Postbacks in range: {counts['postbacks']} ({by_state}).",
        *_class_advice(counts["undelivered_by_class"]),
        f"Conversions lost to an expired click: {counts['expired_click_conversions']}.",
        "Egress IPs the partner must allowlist: " + (", ".join(egress) or "not configured") + ".",
        "",
        "Files:",
        "  ids.csv              affected conversion, transaction and postback ids",
        "  counts.json          counts by state, failure class and status code",
        "  attempts_sample.csv  recent failed attempts with response excerpts (URLs masked)",
        "  partner.json         the partner's current configuration (secrets redacted)",
        "  config_history.json  earlier versions of that configuration, if kept",
        "  offers.json          click session lifespans of the offers involved",
        "  egress_ips.txt       our outbound IP addresses",
    ]
    return "\n".join(lines) + "\n"


def _class_advice(by_class: dict[str, int]) -> list[str]:
    """One line per failure class of the undelivered postbacks: how many, and what to do."""
    lines = []
    for name, n in sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0])):
        if name in FACTS and name != FailureClass.DELIVERED:
            lines.append(f"  {name} ({n}): {FACTS[FailureClass(name)].advice}")
    return ["Undelivered postbacks by failure class:", *lines] if lines else []


def targz(base: str, files: dict[str, str]) -> bytes:
    """The bundle as a .tar.gz whose files sit in the folder `base`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write(files: dict[str, str], out: Path) -> Path:
    """A .tar.gz if `out` ends with .tar.gz or .tgz, else a directory; returns the path."""
    if out.name.endswith((".tar.gz", ".tgz")):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(targz(out.name.removesuffix(".tar.gz").removesuffix(".tgz"), files))
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return out
