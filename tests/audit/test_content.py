"""``content.gtube``: a real mailfort node with and without a content filter on loopback (the
libmilter test filter, a filter that is down; rspamd in tests/server/test_milters.py, where
its server runs already), and the weak server, which records where the auditor sends: the
known local user, never anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfort import config as config_mod
from mailfort.config import MilterConfig
from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.audit.conftest import FAST, audit_content, port_args, run_audit
from tests.audit.weak_server import WeakServer
from tests.conftest import make_config, seed_directory
from tests.milterfilter import FilterProcess

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
NodeFactory = Callable[..., Any]


@pytest.fixture
async def mailfort(tmp_path: Path, server_ssl_context: ssl.SSLContext
                   ) -> AsyncIterator[NodeFactory]:
    """``await mailfort(milter_address...)``: a started node with those ``[[milter]]``s."""
    async with contextlib.AsyncExitStack() as stack:
        async def factory(*addresses: str) -> Node:
            cfg = make_config(tmp_path / f"n{len(addresses)}")
            cfg = config_mod.validate(dataclasses.replace(
                cfg, milter=[MilterConfig(address=a) for a in addresses]))
            seed_directory(cfg)
            return await stack.enter_async_context(Node(cfg, ssl_context=server_ssl_context))

        yield factory


@pytest.fixture
def gtube_milter() -> Iterator[FilterProcess]:
    f = FilterProcess("gtube").start()
    try:
        yield f
    finally:
        f.stop()


def stored(node: Node) -> list[bytes]:
    """Every message in every Maildir of the node."""
    return [p.read_bytes() for p in sorted(node.cfg.mail_path.rglob("*"))
            if p.is_file() and p.parent.name in ("new", "cur")]


def alice_inbox(node: Node) -> list[bytes]:
    box = maildir_for(node.cfg.mail_path, "alice@example.test") / "new"
    return [p.read_bytes() for p in sorted(box.iterdir())] if box.exists() else []


async def test_mailfort_without_a_filter_warns(mailfort: NodeFactory,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    node = await mailfort()
    got = await audit_content(node, capsys)
    assert (got["status"], got["note_key"]) == ("WARN", "content.accepted"), got
    assert got["row"] == "7"
    assert "alice@example.test was accepted at the end of DATA (250 2.0.0" in got["result"]
    assert 'address = "inet:127.0.0.1:11332"' in got["fix"] and "[[milter]]" in got["fix"]
    # one message, the probe, with the null sender, to alice alone
    (raw,) = stored(node)
    assert raw in alice_inbox(node) and GTUBE in raw
    assert raw.startswith(b"Return-Path: <>\r\n")


async def test_mailfort_with_a_filter_that_refuses_gtube_passes_with_its_text(
        mailfort: NodeFactory, gtube_milter: FilterProcess,
        capsys: pytest.CaptureFixture[str]) -> None:
    node = await mailfort(gtube_milter.address)
    got = await audit_content(node, capsys)
    assert (got["status"], got["note_key"]) == ("PASS", "content.refused"), got
    assert "550 5.7.1 Spam refused by the test filter (GTUBE)" in got["result"]
    # the GTUBE message was not stored; the control (no GTUBE) was, for alice alone
    (raw,) = stored(node)
    assert raw in alice_inbox(node) and GTUBE not in raw
    assert b"Subject: mailfort audit: content filter control (no GTUBE)" in raw


async def test_a_filter_that_is_down_is_a_tempfail_warning(
        mailfort: NodeFactory, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    node = await mailfort(f"inet:127.0.0.1:{closed}")
    got = await audit_content(node, capsys)
    assert (got["status"], got["note_key"]) == ("WARN", "content.tempfail"), got
    assert "tempfail: the GTUBE message got 451 4.7.1" in got["result"]
    assert "filter unreachable?" in got["result"]
    assert stored(node) == []


async def test_without_domain_and_user_it_does_not_run(
        mailfort: NodeFactory, capsys: pytest.CaptureFixture[str]) -> None:
    node = await mailfort()
    argv = ["127.0.0.1", "--smtp-port", str(node.port("mx")), *FAST, "--json",
            "--only", "content.gtube"]
    _, out, _ = await asyncio.to_thread(run_audit, capsys, argv)
    (got,) = json.loads(out)["checks"]
    assert (got["status"], got["note_key"]) == ("SKIP", "need.user")
    assert stored(node) == []


def _audit_weak(server: WeakServer, capsys: pytest.CaptureFixture[str],
                user: str = "alice", only: tuple[str, ...] = ("content.gtube",)
                ) -> dict[str, dict[str, Any]]:
    _, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                   "weak.test", "--user", user, *FAST, "--json",
                                   "--only", *only])
    return {c["id"]: c for c in json.loads(out)["checks"]}


@pytest.mark.parametrize("filtered", [True, False])
def test_only_the_known_local_user_is_ever_a_recipient(
        weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
        filtered: bool) -> None:
    """A server that would take anything (open relay, every local part) gets RCPT TO the
    known user and nothing else, and completes messages for that user alone, null sender."""
    server = weak_factory(open_relay=True, accept_unknown=True,
                          no_content_filter=not filtered)
    got = _audit_weak(server, capsys)["content.gtube"]
    assert got["status"] == ("PASS" if filtered else "WARN"), got
    assert set(server.rcpt_args) == {"<alice@weak.test>"}
    assert server.completed == [("", ["alice@weak.test"])]


def test_a_server_that_refuses_every_message_is_no_content_filter(
        weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str]) -> None:
    """554 for GTUBE and 554 for the control too: the refusal is not about content."""
    server = weak_factory(refuse_data=True)
    got = _audit_weak(server, capsys)["content.gtube"]
    assert (got["status"], got["note_key"]) == ("INCONCLUSIVE", "content.control-refused")
    assert "554 5.7.1 Message refused" in got["result"]
    assert server.completed == []


def test_a_refused_known_user_is_inconclusive(
        weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str]) -> None:
    server = weak_factory()
    got = _audit_weak(server, capsys, user="nobody")["content.gtube"]
    assert (got["status"], got["note_key"]) == ("INCONCLUSIVE", "content.rcpt-refused")
    assert "nobody@weak.test was refused at RCPT (550 5.1.1 No such user)" in got["result"]
    assert server.completed == []
