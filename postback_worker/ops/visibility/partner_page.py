"""A partner's own page: a signed, expiring link that shows one partner only its own
postbacks and attempts (secrets masked), failure classes, the configured template, the egress
IPs to allowlist, and a button that sends a test postback.

The link carries `t=<expires>.<HMAC(key, "partner:<id>|<expires>")>` (the dashboard's key and
signature, with the partner id in what is signed), so a link opens exactly one partner's page
and nothing else: not the dashboard, not the API, not another partner's page.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from postback_worker.domain.masking import load_headers, mask_body, mask_headers, mask_url
from postback_worker.ops.visibility.dashboard_auth import check_token, make_token
from postback_worker.settings import Settings
from postback_worker.store import partner_view
from postback_worker.store.repo import Store

LINK_DAYS = 7
MAX_LINK_DAYS = 90
RECENT = 50
CLASS_DAYS = 7


def _purpose(partner_id: str) -> str:
    return f"partner:{partner_id}"


def page_link(settings: Settings, base_url: str, partner_id: str, now: datetime,
              days: float = LINK_DAYS) -> str:
    """A link to the partner's page, valid `days` (raises NoSigningKey without a key)."""
    token = make_token(settings, _purpose(partner_id), now, int(days * 86400))
    return (f"{base_url.rstrip('/')}/partner-page/{quote(partner_id, safe='')}?"
            f"{urlencode({'t': token})}")


def allowed(settings: Settings, partner_id: str, token: str, now: datetime) -> bool:
    """True when `token` is a current link token for exactly this partner."""
    return check_token(settings, _purpose(partner_id), token, now)


def gather(store: Store, settings: Settings, partner: dict[str, Any],
           now: datetime) -> dict[str, Any]:
    """What the page shows, secrets masked (no other partner's data is read)."""
    pid = partner["id"]
    postbacks = partner_view.recent_postbacks(store, pid, RECENT)
    attempts = store.attempts_for([p["id"] for p in postbacks])
    fmt = partner.get("body_format")
    by_postback: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_postback.setdefault(a["postback_id"], []).append({
            "attempt_no": a["attempt_no"], "started_at": a["started_at"],
            "duration_ms": a["duration_ms"], "status_code": a["status_code"],
            "failure_class": a["failure_class"], "error": a["error"],
            "is_test": a["is_test"], "url": mask_url(a["url"])})
    return {
        "partner_id": pid, "name": partner.get("name") or pid,
        "generated_at": now,
        "template": {
            "method": partner["method"], "url": mask_url(partner["postback_url"]),
            "body_format": fmt,
            "body": mask_body(partner.get("body_template"), fmt),
            "headers": mask_headers(load_headers(partner.get("custom_headers"))),
            "signing": (partner.get("signature_scheme") or "hmac")
            if partner.get("hmac_secret") else None,
        },
        "paused": bool(partner.get("paused")), "paused_reason": partner.get("paused_reason"),
        "egress_ips": list(settings.delivery.egress_ips),
        "failure_classes": partner_view.class_counts(store, pid,
                                                     now - timedelta(days=CLASS_DAYS)),
        "postbacks": [{
            "id": p["id"], "state": p["state"], "attempts": p["attempts"],
            "method": p["method"], "url": mask_url(p["url"]),
            "body": mask_body(p["body"], fmt or "form"),
            "last_status": p["last_status"], "last_class": p["last_class"],
            "reason": p["reason"], "created_at": p["created_at"],
            "delivered_at": p["delivered_at"], "attempt_list": by_postback.get(p["id"], []),
        } for p in postbacks],
    }


STYLE = ("body{font:14px system-ui,sans-serif;margin:24px;color:#222}"
         "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
         "padding:3px 6px;text-align:left;vertical-align:top}code{word-break:break-all}"
         ".muted{color:#777}.bad{color:#a00}")


def _t(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def render_html(data: dict[str, Any], token: str, test_result: dict[str, Any] | None = None,
                ) -> str:
    pid = data["partner_id"]
    tpl = data["template"]
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>Postbacks for {escape(data['name'])}</title><style>{STYLE}</style></head><body>",
        f'<h1 id="partner">Postbacks for {escape(data["name"])}</h1>',
        f'<p class="muted">partner {escape(pid)} &middot; as of '
        f"{escape(_t(data['generated_at']))} UTC</p>",
    ]
    if data["paused"]:
        out.append(f'<p class="bad" id="paused">Paused: {escape(_t(data["paused_reason"]))}</p>')
    out += ['<h2>Your postback template</h2><table id="template">',
            f"<tr><th>method</th><td>{escape(tpl['method'])}</td></tr>",
            f"<tr><th>URL</th><td><code>{escape(tpl['url'])}</code></td></tr>"]
    if tpl["body"]:
        out.append(f"<tr><th>body ({escape(tpl['body_format'] or '')})</th><td><code>"
                   f"{escape(tpl['body'])}</code></td></tr>")
    for name, value in tpl["headers"].items():
        out.append(f"<tr><th>header</th><td><code>{escape(name)}: {escape(value)}</code></td>"
                   "</tr>")
    if tpl["signing"]:
        out.append(f"<tr><th>signed</th><td>{escape(tpl['signing'])}</td></tr>")
    out.append("</table>")
    ips = ", ".join(data["egress_ips"]) or "(ask us: none configured)"
    out.append(f'<h2>Our addresses to allowlist</h2><p id="egress-ips"><code>{escape(ips)}'
               "</code></p>")
    out.append('<h2>Send a test postback</h2>'
               f'<form method="post" action="/partner-page/{escape(quote(pid, safe=""))}/test">'
               f'<input type="hidden" name="t" value="{escape(token)}">'
               '<button type="submit" id="send-test">Send a test postback</button></form>')
    if test_result is not None:
        out.append('<div id="test-result"><p>Test postback '
                   f"{escape(_t(test_result.get('postback_id')))}: "
                   f"{escape(_t(test_result.get('outcome')))}</p>"
                   f"<p>{escape(_t(test_result.get('advice')))}</p></div>")
    classes = data["failure_classes"]
    out.append(f'<h2>Attempts by outcome, last {CLASS_DAYS} days</h2><table id="classes">'
               "<tr><th>class</th><th>attempts</th></tr>"
               + "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>"
                         for k, v in sorted(classes.items(), key=lambda kv: -kv[1]))
               + "</table>")
    out.append(f'<h2>Latest {RECENT} postbacks</h2><table id="postbacks"><tr><th>postback id'
               "</th><th>state</th><th>created</th><th>request</th><th>attempts</th></tr>")
    for p in data["postbacks"]:
        attempts = "<br>".join(
            f"#{a['attempt_no']} {escape(_t(a['started_at']))} "
            f"{escape(_t(a['status_code']) or '-')} {escape(a['failure_class'])}"
            + (f" <span class=\"muted\">{escape(a['error'])}</span>" if a["error"] else "")
            for a in p["attempt_list"])
        request = f"{escape(p['method'])} <code>{escape(p['url'])}</code>"
        if p["body"]:
            request += f"<br><code>{escape(p['body'])}</code>"
        out.append(f'<tr class="postback"><td><code>{escape(p["id"])}</code></td>'
                   f"<td>{escape(p['state'])}</td><td>{escape(_t(p['created_at']))}</td>"
                   f"<td>{request}</td><td>{attempts}</td></tr>")
    out.append("</table></body></html>")
    return "".join(out)


def refused_page() -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Link expired'
            "</title></head><body><h1>This link is invalid or has expired</h1><p>Ask your "
            "contact for a new link to your postback page.</p></body></html>")
