"""``mailfort lab`` as a learner runs it: the whole session in Japanese with an HTML page
(rendered by headless Chromium, Debian's ``chromium``, installed by ``run-tests`` as root,
its screenshot kept), --list, --pace, the loopback-only rule, and Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mailfort
from mailfort import cli
from mailfort.lab import catalogue
from mailfort.lab.attacks import ATTACKS
from tests.browser import rendered_size, self_contained

SRC = Path(mailfort.__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["lab", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ja_session(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """The whole lab, every attack, in Japanese, with the HTML page (one run)."""
    import contextlib
    import io

    page = tmp_path_factory.mktemp("lab") / "lab.html"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["lab", "--lang", "ja", "--html", str(page)])
    return code, out.getvalue(), page


def test_japanese_session(ja_session: tuple[int, str, Path]) -> None:
    code, out, _ = ja_session
    assert code == 0  # nothing got through the hardened server
    for term in ("第三者中継", "オープンリレー", "NDRスパム", "SMTP-AUTH", "VRFY/EXPN",
                 "バッファオーバーフロー", "対策", "まとめ"):
        assert term in out, term
    summary = out[out.rindex("まとめ"):]
    ui = catalogue.load("ja").UI
    for name in ATTACKS:
        row = next(ln for ln in summary.splitlines() if f" {name} " in ln + " ")
        assert ui["succeeded"] in row and row.rstrip().endswith(ui["stopped"]), row
    assert "Lab stopped" not in out and ui["stopped_lab"] in out
    # Words of the catalogue, never Python's: the backscatter's bounce carried the spam.
    assert "True" not in out and "False" not in out
    assert "(スパムを添付: はい)" in out


def test_english_words_not_python_booleans(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, ["--attack", "backscatter"])
    assert code == 0
    assert "(spam inside: yes)" in out and "True" not in out


def test_html_is_self_contained(ja_session: tuple[int, str, Path]) -> None:
    _, _, page = ja_session
    text = page.read_text(encoding="utf-8")
    data = self_contained(text, "lab-session")
    assert [a["name"] for a in data["attacks"]] == list(ATTACKS)
    assert all(a["sides"]["legacy"]["succeeded"] and not a["sides"]["hardened"]["succeeded"]
               for a in data["attacks"])
    assert text.count("<section") == len(ATTACKS)
    assert text.count('class="cols"') == len(ATTACKS)  # the two servers side by side
    assert "第三者中継" in text and "&lt;alice@example.test&gt;" in text  # escaped


def test_japanese_report_tells_the_imap_sniffing(ja_session: tuple[int, str, Path]) -> None:
    """④ in the terminal and on the page: alice's IMAP LOGIN read off the legacy wire, and
    the hardened server's LOGINDISABLED and NO [PRIVACYREQUIRED]."""
    _, out, page = ja_session
    notes = catalogue.load("ja").NOTES
    section = out[out.index("④ "):out.index("⑤ ")]
    assert "IMAP LOGIN" in section and "[connect imap (imap)]" in section
    assert notes["imap.login-in-clear"] in section
    assert notes["imap.login-refused"] in section
    assert "A NO [PRIVACYREQUIRED]" in section
    data = self_contained(page.read_text(encoding="utf-8"), "lab-session")
    sniff = next(a for a in data["attacks"] if a["name"] == "sniff")
    assert sniff["row"] == "4"
    legacy, hardened = sniff["sides"]["legacy"], sniff["sides"]["hardened"]
    assert any("IMAP LOGIN" in c for c in legacy["consequences"])
    assert "[imap]" in legacy["wire"] and "[imap]" in hardened["wire"]
    assert any(ln.startswith("> L LOGIN alice@example.test \"") for ln in legacy["wire"])
    assert not any("L LOGIN" in ln for ln in hardened["wire"])  # inside TLS there
    assert notes["imap.login-refused"] in hardened["consequences"]


def test_english_report_tells_the_imap_sniffing(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    page = tmp_path / "sniff.html"
    code, out, _ = _run(capsys, ["--attack", "sniff", "--html", str(page)])
    assert code == 0
    assert "password recovered: Tr0ub4dor&3-horse (from SMTP AUTH PLAIN; POP3 PASS; " \
           "IMAP LOGIN)" in out
    assert "IMAP: LOGINDISABLED before STARTTLS, LOGIN refused with NO " \
           "[PRIVACYREQUIRED]" in out
    text = page.read_text(encoding="utf-8")
    assert "④ Plaintext" in text and "IMAP: LOGIN taken in the clear" in text


def test_html_renders_in_chromium(ja_session: tuple[int, str, Path], tmp_path: Path) -> None:
    _, _, page = ja_session
    shot = tmp_path / "lab-session.png"
    assert rendered_size(page, shot, width=1400, height=2400) == (1400, 2400)


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, ["--list"])
    assert code == 0
    lines = out.splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == list(ATTACKS)
    en = catalogue.load("en").ATTACKS
    assert all(en[name]["summary"] in ln for name, ln in zip(ATTACKS, lines, strict=True))
    # Marked with the one table's numbers, as the audit's rows: backscatter is ③.
    assert lines[list(ATTACKS).index("backscatter")].split()[1] == "③"


def test_catalogues_have_the_same_keys() -> None:
    en, ja = catalogue.load("en"), catalogue.load("ja")
    assert set(en.ATTACKS) == set(ja.ATTACKS) == set(ATTACKS)
    for name in ATTACKS:
        assert set(en.ATTACKS[name]) == set(ja.ATTACKS[name])
        assert en.ATTACKS[name]["row"] == ja.ATTACKS[name]["row"]
    assert set(en.NOTES) == set(ja.NOTES) and set(en.UI) == set(ja.UI)


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.1", "::", "localhost"])
def test_refuses_any_other_address(capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, _, err = _run(capsys, ["--address", address])
    assert code == 2 and "127.0.0.1 only" in err


def test_pace_slows_each_step(capsys: pytest.CaptureFixture[str]) -> None:
    """16 commands per server, two servers, 0.1 s each: at least 3.2 s, where an unpaced run
    of this attack takes well under one. Only the lower bound is asserted (a loaded machine
    makes runs slower, never faster)."""
    t = time.monotonic()
    code, out, _ = _run(capsys, ["--attack", "vrfy", "--pace", "0.1"])
    assert code == 0 and "VRFY bob" in out
    assert time.monotonic() - t >= 3.2


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_cleanly_and_removes_scratch(
    tmp_path: Path, signum: int, status: int,
) -> None:
    """Ctrl-C, and SIGTERM (``kill``, systemd, a closing terminal pane) alike: the servers
    stop and the scratch directory is gone, 128 + the signal's number."""
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    # As from a terminal: SIGINT at its default. A suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and CPython then keeps it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "mailfort", "lab", "--pace", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("mailfort-lab-*/hardened/data")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # an attack is under way
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert list(tmp_path.glob("mailfort-lab-*")) == []
