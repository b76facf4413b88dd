"""Reports: Japanese explanations, one self-contained HTML page built from the same JSON,
and that page rendered by headless Chromium (Debian's ``chromium``, installed by
``run-tests`` as root) without console errors, its screenshot kept as an artefact."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfort import weaknesses
from mailfort.audit import catalogue
from mailfort.audit.schema import validate
from tests.audit.conftest import FAST, port_args, run_audit
from tests.audit.weak_server import WeakServer
from tests.browser import rendered_size, self_contained

ONLY = ["--only", "relay", "backscatter", "disclosure", "limits.nul"]


@pytest.fixture
def weak_report(weak_factory: Callable[..., WeakServer], tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> tuple[dict, Path]:
    """A Japanese run with three FAILs, as JSON and as HTML from the same invocation."""
    server = weak_factory(open_relay=True, vrfy_confirms=True, banner_version=True)
    page = tmp_path / "report.html"
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                      "weak.test", "--user", "alice", *FAST, *ONLY,
                                      "--lang", "ja", "--json", "--html", str(page)])
    assert code == 1
    return json.loads(out), page


def test_japanese_json_uses_the_terms(weak_report: tuple[dict, Path]) -> None:
    report, _ = weak_report
    assert validate(report) == []
    assert report["lang"] == "ja"
    by_id = {c["id"]: c for c in report["checks"]}
    assert "第三者中継" in by_id["relay.open"]["title"]
    assert "オープンリレー" in by_id["relay.open"]["title"]
    assert "NDRスパム" in by_id["backscatter.unknown-user"]["title"]
    assert "VRFY/EXPN" in by_id["disclosure.vrfy-expn"]["title"]
    assert "BOF" in by_id["disclosure.banner"]["why"]
    assert "第三者中継の試行" in by_id["relay.open"]["result"]  # the result notes too


def test_japanese_terminal_output(weak_factory: Callable[..., WeakServer],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    server = weak_factory(open_relay=True)
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                      "weak.test", "--user", "alice", *FAST, "--only",
                                      "relay", "--lang", "ja"])
    assert code == 1
    assert out.splitlines()[1].startswith("概要: 1 FAIL")
    assert "第三者中継" in out and "対策" in out


def test_html_is_self_contained_and_built_from_the_json(
        weak_report: tuple[dict, Path]) -> None:
    report, page = weak_report
    text = page.read_text(encoding="utf-8")
    assert self_contained(text, "report") == report
    # Summary first, then one section per check, failures first.
    assert text.index('class="counts"') < text.index("<section")
    assert text.count("<section") == len(report["checks"])
    sections = re.findall(r'<section id="[^"]+" class="(\w+)"', text)
    assert sections[:3] == ["FAIL", "FAIL", "FAIL"]
    ui = catalogue.load("ja").UI
    assert ui["fix"] in text and "第三者中継" in text
    # Each check names its weakness by the one table's number and Japanese name.
    assert f"{ui['row']} 2: {weaknesses.by_number('2').ja}" in text
    # Whatever a server said is escaped, never markup.
    assert "<mailfort-audit@" not in text


def test_html_renders_in_chromium(weak_report: tuple[dict, Path], tmp_path: Path) -> None:
    _, page = weak_report
    shot = tmp_path / "audit-report.png"
    assert rendered_size(page, shot, width=1200, height=2200) == (1200, 2200)
