"""Against the reference Postfix of ../shared/anchors/postfix-reference.sh, when it runs.

The test does not start it (it is a system service shared with the benchmarks); it is
skipped unless something greets on 127.0.0.1:10025.
"""

from __future__ import annotations

import json
import socket

import pytest

from mailfort.audit.schema import validate
from tests.audit.conftest import run_audit

PORT = 10025


def _postfix_greets() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=1) as s:
            s.settimeout(2)
            return s.recv(512).startswith(b"220 ")
    except OSError:
        return False


def test_reference_postfix_is_no_open_relay(capsys: pytest.CaptureFixture[str]) -> None:
    if not _postfix_greets():
        pytest.skip("the reference Postfix is not running on 127.0.0.1:10025 "
                    "(../shared/anchors/postfix-reference.sh start)")
    code, out, _ = run_audit(capsys, [
        "127.0.0.1", "--smtp-port", str(PORT), "--submission-port", "0",
        "--submissions-port", "0", "--pop3-port", "0", "--pop3s-port", "0",
        "--imap-port", "0", "--imaps-port", "0", "--managesieve-port", "0",
        "--domain", "example.test", "--user", "alice", "--timeout", "5",
        "--idle-connections", "10", "--resolver", "127.0.0.1:9", "--json"])
    report = json.loads(out)
    assert validate(report) == []
    assert code in (0, 1)  # the run completes (its plaintext-only setup FAILs tls.starttls)
    by_id = {c["id"]: c["status"] for c in report["checks"]}
    assert by_id["relay.open"] == "PASS"
    assert by_id["backscatter.unknown-user"] == "PASS"
    # No false verdicts on its plaintext-only, stock-limits setup: no TLS means nothing to
    # say about versions, ciphers or certificates; the 1,000-recipient limit is a limit, and
    # a line it cuts (safely) cannot be told from outside from one it would hold.
    for tls_check in ("tls.versions", "tls.ciphers", "tls.certificate"):
        assert by_id[tls_check] == "SKIP", tls_check
    assert by_id["limits.long-line"] == "WARN"  # cut at line_length_limit, not provable
    assert by_id["limits.recipients"] == "PASS"
