"""Template validator against real-world postback URLs from public partner documentation.

Each row: the template as published (or as it arrives after a typical copy-paste), where it
comes from, and the problems expected as (severity, code, position, fix). Templates are
written with our macros where the tracker's macros match ours (TUNE's are the same names).
"""

from __future__ import annotations

import pytest

from postback_worker.domain.validator import RENDER_BLOCKING, host_of, suggest, validate

NO_TX = ("warning", "no_transaction_id", 0, "add a parameter such as &tid={transaction_id}")
HTTP = ("warning", "http", 0, "https://")

REAL_WORLD = [
    # docs.tracklysms.com/integrations/tune: TUNE global postback (TUNE macros are ours).
    ("https://app.tracklysms.com/api/postbacks/tune?click_id={aff_sub}&payout={payout}"
     "&conversion_id={transaction_id}", []),
    # docs.tracklysms.com/guides/offers/tune-integration: no transaction id, only aff_sub.
    ("https://app.tracklysms.com/api/postbacks/tune?click_id={aff_sub}&payout={payout}",
     [NO_TX]),
    # support.tune.com "Receiving Conversions via Postback URL", TRANSACTION_ID filled in.
    ("http://examplenetwork.go2cloud.org/aff_lsr?offer_id=26&transaction_id={transaction_id}",
     [HTTP]),
    # The same URL pasted as published: the placeholder was never replaced.
    ("http://examplenetwork.go2cloud.org/aff_lsr?offer_id=26&transaction_id=TRANSACTION_ID",
     [("error", "placeholder", 70, "{transaction_id}"), HTTP, NO_TX]),
    # doc.voluum.com "Submitting a Postback URL": the template with REPLACE/OPTIONAL.
    ("https://voluum_dedicated_domain.com/postback?cid=REPLACE&payout=OPTIONAL&txid=OPTIONAL",
     [("error", "host_name", 8, "voluum-dedicated-domain.com"),
      ("error", "placeholder", 49, "{transaction_id}"),
      ("error", "placeholder", 64, "{payout}"),
      ("error", "placeholder", 78, "{transaction_id}"), NO_TX]),
    # doc.voluum.com "Track Conversions Using S2S Postback URL", as the page renders it:
    # "&currency" and "&param1" became the glyphs of &curren and &para.
    ("https://track.radantus.com/postback?cid={}&payout={}&txid={}\u00a4cy={}&et={}\u00b6m1={}",
     [("error", "braces", 40, "{transaction_id}"), ("error", "braces", 50, "{transaction_id}"),
      ("error", "braces", 58, "{transaction_id}"), ("error", "html_entity", 60, "&curren"),
      ("error", "braces", 64, "{transaction_id}"), ("error", "braces", 70, "{transaction_id}"),
      ("error", "html_entity", 72, "&para"), ("error", "braces", 76, "{transaction_id}"),
      NO_TX]),
    # support.getcake.com "How Affiliates Can Use Tokens": CAKE #hash# tokens.
    ("https://MyPostbackURL.com/?click_id=#s2#&affiliate=#s1#",
     [("error", "lookalike", 36, "{aff_sub2}"), ("error", "lookalike", 51, "{aff_sub}"),
      NO_TX]),
    # A Voluum postback filled with CAKE tokens (public paste): CAKE syntax plus OPTIONAL.
    ("http://track.rimrket.com/postback?cid=#s2#&payout=#price#&txid=#tid#&et=OPTIONAL",
     [("error", "lookalike", 38, "{aff_sub2}"), ("error", "lookalike", 50, "{payout}"),
      ("error", "lookalike", 63, "{transaction_id}"),
      ("error", "placeholder", 72, "{transaction_id}"), HTTP, NO_TX]),
    # Keitaro postback with AdCombo macros (public paste).
    ("http://5.187.4.23/e89bcbe/postback?subid={subacc4}&payout={revenue}&status={status}"
     "&tid={trans_id}&from=adcombo.com&lead_status=hold&sale_status=lead",
     [("error", "unknown_macro", 41, ""),  # {revenue} is a lifecycle macro of ours
      ("error", "unknown_macro", 88, "{transaction_id}"), HTTP, NO_TX]),
    # An advertiser pixel using <angle> tokens (public paste, token shortened).
    ("https://advertiser.drcash.me/v1/postback?access_token=74581a0d8c&status=approved"
     "&tracking_uuid=<bannerid>&transaction_id=<orderid>&payout=<payout>",
     [("error", "lookalike", 95, ""), ("error", "lookalike", 121, "{adv_sub}"),
      ("error", "lookalike", 138, "{payout}"), NO_TX]),
    # A PHP postback with unfilled variables and "&currency" mangled into U+00A4.
    ("http://185.179.188.119/86258df/postback?sub_id=$m&status=$status&payout=$webTotal"
     "\u00a4cy=rub&from=M1-shop.ru",
     [("error", "lookalike", 47, ""), ("error", "lookalike", 57, "{status}"),
      ("error", "lookalike", 72, ""), ("error", "html_entity", 81, "&curren"), HTTP, NO_TX]),
    # pub.acornads.com "Postback Documentation": the network's own macro names.
    ("https://exampleurl.com/postback.php?offerID={offer_id}&subid1={s1}&payout={amount}"
     "&transID={transaction_id}&ip={ip_address}",
     [("error", "unknown_macro", 62, "{aff_sub}"), ("error", "unknown_macro", 74, "{sale_amount}"),
      ("error", "unknown_macro", 111, "{ip}")]),
    # PropellerAds-style ${MACRO} tokens.
    ("https://ad.propellerads.com/conversion.php?aid=123&tid=456&visitor_id=${SUBID}"
     "&payout=${PAYOUT}",
     [("error", "lookalike", 70, "{aff_sub}"), ("error", "lookalike", 86, "{payout}"), NO_TX]),
    # Everflow partner postback written with our macros.
    ("https://partner.example/everflow?clickid={aff_sub}&payout={payout}"
     "&txid={transaction_id}&ts={timestamp}", []),
    # Copied from HTML source: &amp; between parameters.
    ("https://partner.example/pb?tid={transaction_id}&amp;payout={payout}",
     [("error", "html_entity", 47, "&")]),
    # Duplicate parameter: partners read only the first (or the last).
    ("https://partner.example/pb?tid={transaction_id}&payout={payout}&tid={aff_sub}",
     [("error", "duplicate", 64, "remove one of them")]),
    # A '#' cuts the rest of the URL: the payout is never sent.
    ("https://partner.example/pb?tid={transaction_id}#&payout={payout}",
     [("error", "fragment", 47, "%23")]),
    # Unencoded characters in the fixed part.
    ("https://partner.example/pb?tid={transaction_id}&note=caf\u00e9|x&pct=5%",
     [("error", "encoding", 56, "%C3%A9"), ("error", "encoding", 57, "%7C"),
      ("error", "encoding", 65, "%25")]),
    # CR/LF pasted into a template.
    ("https://partner.example/pb?tid={transaction_id}\r\nX-Injected: 1",
     [("error", "whitespace", 47, "%20"), ("error", "whitespace", 60, "%20")]),
    # {REPLACE} placeholder in our own brace syntax.
    ("https://partner.example/pb?tid={REPLACE}",
     [("error", "unknown_macro", 31, "{transaction_id}"), NO_TX]),
    # [[subid]] (double brackets) and %payout% syntaxes.
    ("https://partner.example/pb?tid={transaction_id}&s=[[subid]]&p=%payout%",
     [("error", "lookalike", 50, "{aff_sub}"), ("error", "lookalike", 62, "{payout}")]),
]


@pytest.mark.parametrize(("template", "expected"), REAL_WORLD,
                         ids=[f"row{i}" for i in range(len(REAL_WORLD))])
def test_real_world_templates(template: str, expected: list[tuple[str, str, int, str]]) -> None:
    found = [(p.severity, p.code, p.position, p.fix) for p in validate(template)]
    assert found == expected, [p.describe() for p in validate(template)]


def test_table_has_at_least_ten_valid_and_broken_templates() -> None:
    valid = [t for t, e in REAL_WORLD if all(s == "warning" for s, *_ in e)]
    broken = [t for t, e in REAL_WORLD if any(s == "error" for s, *_ in e)]
    assert len(valid) >= 4 and len(broken) >= 10


def test_every_problem_has_a_position_inside_the_template_and_a_message() -> None:
    for template, _ in REAL_WORLD:
        for p in validate(template):
            assert 0 <= p.position < len(template)
            assert p.message and "\n" not in p.message


@pytest.mark.parametrize(
    ("code", "blocks"),
    [("lookalike", True), ("unknown_macro", True), ("braces", True), ("scheme", True),
     ("encoding", False), ("duplicate", False), ("html_entity", False), ("fragment", False)],
)
def test_which_errors_block_rendering(code: str, blocks: bool) -> None:
    assert (code in RENDER_BLOCKING) is blocks


@pytest.mark.parametrize(
    ("name", "expected"),
    [("clickid", "transaction_id"), ("Payout", "payout"), ("sub3", "aff_sub3"),
     ("transacton_id", "transaction_id"), ("zzqq", None), ("price", "payout")],
)
def test_suggest(name: str, expected: str | None) -> None:
    assert suggest(name) == expected


@pytest.mark.parametrize(
    ("template", "host"),
    [("https://p.example:8443/x?y={transaction_id}", ("p.example", 8)),
     ("https://u:pw@p.example/x", ("p.example", 13)),
     ("https://[2001:db8::1]:80/x", ("2001:db8::1", 8)),
     ("p.example/x", None), ("https:///x", None), ("https://{source}.example/", None)],
)
def test_host_of(template: str, host: tuple[str, int] | None) -> None:
    assert host_of(template) == host
