"""The catalogues are complete: every check and every result note, in every language."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailfort.audit import catalogue
from mailfort.audit.registry import all_checks

CHECK_SOURCES = Path(catalogue.__file__).parent.parent


def _note_keys_in_code() -> set[str]:
    """Every note key a probe can return: Verdict(STATUS, "key"…), skip("key"…), …, and
    the parts of a list field, part("key"…)."""
    pattern = re.compile(r'(?:Verdict\(\w+,\s*|skip\(|inconclusive\(|Stop\(\w+,\s*|part\(\s*)'
                         r'"([a-z0-9.-]+)"')
    keys: set[str] = set()
    for path in CHECK_SOURCES.rglob("*.py"):
        keys |= set(pattern.findall(path.read_text(encoding="utf-8")))
    return keys


@pytest.mark.parametrize("lang", catalogue.LANGUAGES)
def test_catalogue_covers_every_check_and_note(lang: str) -> None:
    cat = catalogue.load(lang)
    assert set(cat.CHECKS) == {c.id for c in all_checks()}
    for text in cat.CHECKS.values():
        assert set(text) == {"title", "why", "fix", "postfix"}
        assert all(v.strip() for v in text.values())
    used = _note_keys_in_code()
    assert len(used) > 60  # the pattern really finds the probes' notes
    assert used <= set(cat.NOTES)


def test_languages_have_the_same_keys_and_fields() -> None:
    en, ja = catalogue.load("en"), catalogue.load("ja")
    assert set(en.NOTES) == set(ja.NOTES)
    assert set(en.UI) == set(ja.UI)
    field = re.compile(r"\{(\w+)\}")
    for key in en.NOTES:
        assert set(field.findall(en.NOTES[key])) == set(field.findall(ja.NOTES[key])), key


def test_japanese_uses_the_study_texts_terms() -> None:
    ja = catalogue.load("ja")
    text = " ".join(v for entry in ja.CHECKS.values() for v in entry.values())
    for term in ("第三者中継", "NDRスパム", "オープンリレー", "SMTP-AUTH", "VRFY/EXPN", "BOF"):
        assert term in text, term


def test_note_fills_fields_and_survives_a_missing_one() -> None:
    en = catalogue.load("en")
    assert catalogue.note(en, "rcpt.limited", {"n": 1000, "ok": 100}) == \
        "100 of 1000 recipients accepted"
    assert catalogue.note(en, "rcpt.limited", {}) == "? of ? recipients accepted"
    with pytest.raises(ValueError):
        catalogue.load("fr")


@pytest.mark.parametrize("lang", catalogue.LANGUAGES)
def test_every_note_has_words_of_its_own(lang: str) -> None:
    """A template that is one bare field ("{where}") lets the probe write the sentence, in
    English whatever --lang says: the WARN of a self-signed certificate did. The keys
    matched and the fields matched, so the test above could not see it."""
    bare = [k for k, v in catalogue.load(lang).NOTES.items() if re.fullmatch(r"\{\w+\}", v)]
    assert bare == []


def test_note_tells_bools_and_parts_in_the_catalogues_words() -> None:
    en, ja = catalogue.load("en"), catalogue.load("ja")
    parts = [("cert.why.self-signed", {"service": "smtp"}),
             ("cert.why.expires-soon", {"service": "pop3s", "days": 3})]
    assert catalogue.note(en, "cert.unverified", {"where": parts}) == \
        "the certificate does not verify: smtp: self-signed certificate; pop3s: expires in 3 days"
    assert catalogue.note(ja, "cert.unverified", {"where": parts}) == \
        "証明書を検証できない: smtp: 自己署名証明書、pop3s: あと 3 日で期限切れ"
    assert catalogue.note(ja, "size.none", {"x": True}) == ja.NOTES["size.none"]
    from mailfort.lab import catalogue as lab

    lab_ja = lab.load("ja")
    said = lab.note(lab_ja, "forged.bounce", {"to": "v@x.example", "spam": True})
    assert "True" not in said and "はい" in said
