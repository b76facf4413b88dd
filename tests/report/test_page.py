"""The page helper both reports use: one self-contained file whose data cannot break out
of its element, and whose title is text, not markup."""

from __future__ import annotations

from mailfort.report import page
from tests.browser import self_contained


def test_document_embeds_the_data_and_escapes_the_title() -> None:
    data = {"said": "</script><script>alert(1)</script>", "ja": "第三者中継"}
    text = page.document(lang="ja", title="<b>report</b> & co", body="<p>body</p>",
                         css="p { color: red; }\n", data_id="report", data=data)
    assert self_contained(text, "report") == data
    assert "<title>&lt;b&gt;report&lt;/b&gt; &amp; co</title>" in text
    assert "<h1>&lt;b&gt;report&lt;/b&gt; &amp; co</h1>" in text
    assert '<html lang="ja">' in text and "<p>body</p>" in text
    # The common style, then the report's own rules (later ones win).
    assert text.index("max-width: 62rem") < text.index("p { color: red; }")


def test_badge_escapes_its_text() -> None:
    assert page.badge("FAIL", "<x>") == '<span class="badge FAIL">&lt;x&gt;</span>'
