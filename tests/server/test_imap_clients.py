"""Real IMAP clients against a real server: isync (mbsync), offlineimap3, interimap (QRESYNC)
and neomutt (headless, on a pseudo-terminal), each over TLS (STARTTLS or implicit) with a
trustme certificate it checks. Each reads the mail delivered to the server, then flags one
message, deletes one and moves one to Archive; the server must show exactly that over IMAP
afterwards, and POP3 must show the maildrop without the deleted and moved ones.

Proven today against the reference Dovecot (behind tests/imapclients.TLSFront, since it
is configured without TLS); the same runs against ``mailfort serve`` skip, with the config
loader's reason, until this branch has the IMAP server.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from tests import imapclients as clients
from tests.imapscript import MESSAGES
from tests.server import imapserve

MAIL = MESSAGES[:4]
CHANGES = clients.Changes(flag={"diff-0@remote.test": {"\\Seen", "\\Flagged"}},
                          delete=["diff-1@remote.test"],
                          move={"diff-2@remote.test": "Archive"})
EXPECTED = {"INBOX": {"diff-0@remote.test": {"\\Seen", "\\Flagged"},
                      "diff-3@remote.test": set()},
            "Archive": {"diff-2@remote.test": set()}}
SYNC: dict[str, Callable[..., clients.Result]] = {
    "mbsync": clients.mbsync_sync, "offlineimap": clients.offlineimap_sync,
    "interimap": clients.interimap_sync, "neomutt": clients.neomutt_list,
}
# each client once per TLS mode it is most used with; mbsync both (the reference client)
CASES = [("mbsync", "starttls"), ("mbsync", "implicit"), ("offlineimap", "implicit"),
         ("interimap", "starttls"), ("neomutt", "implicit")]


def _installed(name: str) -> bool:
    return shutil.which(name) is not None and (name != "interimap"
                                               or Path(clients.DOVECOT_IMAP).exists())


ROOT = os.geteuid() == 0
# the reference Dovecot's Maildirs belong to vmail; interimap's local Dovecot runs as nobody
NEEDS_ROOT = pytest.mark.skipif(not ROOT, reason="writes Maildirs as another account: root only")


def _case(client: str, mode: str) -> object:
    marks = [pytest.mark.skipif(not _installed(client),
                                reason=f"{client} is not installed (run-tests installs it)")]
    if client == "interimap":
        marks.append(NEEDS_ROOT)
    return pytest.param(client, mode, id=f"{client}-{mode}", marks=marks)


PARAMS = [_case(c, m) for c, m in CASES]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def front_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[
        ssl.SSLContext, Path]:
    """The TLS front's server context and the CA file the clients trust."""
    where = tmp_path_factory.mktemp("front")
    chain, key, cafile = imapserve.cert_files(ca, where)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(chain, key)
    return ctx, cafile


@pytest.fixture(scope="module")
def mailfort(ca: trustme.CA) -> Iterator[imapserve.Mailfort]:
    with imapserve.start(ca) as mf:
        yield mf


def _check_client(result: clients.Result, client: str) -> None:
    """What the client read: the delivered messages, whole (subject and size)."""
    got = {m.message_id: m for m in result.pulled["INBOX"]}
    assert sorted(got) == [f"diff-{i}@remote.test" for i in range(len(MAIL))], result.log
    assert got["diff-3@remote.test"].subject == "alternatives"
    assert all(m.size > 200 for m in got.values())
    if client != "neomutt":  # neomutt makes its changes in one run (no local copy after)
        after = {f: {m.message_id: set(m.flags) for m in ms} for f, ms in result.after.items()}
        assert after == EXPECTED, result.log


@NEEDS_ROOT
@pytest.mark.parametrize(("client", "mode"), PARAMS)
def test_client_against_reference_dovecot(reference_dovecot: int, front_files: tuple[
        ssl.SSLContext, Path], client: str, mode: str) -> None:
    ctx, cafile = front_files
    imapserve.dovecot_reset(reference_dovecot)
    imapserve.dovecot_deliver(MAIL)
    try:
        with clients.TLSFront(reference_dovecot, ctx, mode) as front, \
                clients.workdir(f"mf-{client}-") as work:
            account = clients.Account(front.port, "bob@example.test", "bobpw", mode,
                                      str(cafile), "localhost")
            result = SYNC[client](account, work, CHANGES)
        _check_client(result, client)
        imap = imaplib.IMAP4("127.0.0.1", reference_dovecot, timeout=20)
        imap.login("bob@example.test", "bobpw")
        assert imapserve.imap_state(imap) == EXPECTED, result.log
        assert imapserve.dovecot_pop3_ids() == sorted(EXPECTED["INBOX"])
    finally:
        imapserve.dovecot_reset(reference_dovecot)


@pytest.mark.parametrize(("client", "mode"), PARAMS)
def test_client_against_mailfort(mailfort: imapserve.Mailfort, client: str,
                                 mode: str) -> None:
    user = "bob@example.test"
    for data in MAIL:
        mailfort.deliver(user, data)
    try:
        with clients.workdir(f"mf-{client}-") as work:
            result = SYNC[client](mailfort.account(user, mode), work, CHANGES)
        _check_client(result, client)
        assert imapserve.imap_state(mailfort.imap(user)) == EXPECTED, result.log
        assert mailfort.pop3_ids(user) == sorted(EXPECTED["INBOX"])
    finally:
        _empty(mailfort, user)


def _empty(mailfort: imapserve.Mailfort, user: str) -> None:
    """INBOX and Archive emptied over IMAP, for the next client."""
    imap = mailfort.imap(user)
    try:
        for folder in ("INBOX", "Archive"):
            typ, data = imap.select(folder)
            if typ == "OK" and data[0] != b"0":
                imap.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
                imap.expunge()
    finally:
        imap.logout()


@pytest.mark.skipif(not _installed("mbsync"), reason="mbsync is not installed")
@pytest.mark.parametrize("server", ["dovecot", "mailfort"])
def test_a_client_refuses_a_certificate_its_ca_file_does_not_vouch_for(
        request: pytest.FixtureRequest, front_files: tuple[ssl.SSLContext, Path],
        server: str) -> None:
    """The TLS settings above really check: another CA, and mbsync stops before LOGIN."""
    other = Path(front_files[1]).parent / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with clients.workdir("mf-badca-") as work:
        if server == "dovecot":
            port = request.getfixturevalue("reference_dovecot")
            with clients.TLSFront(port, front_files[0], "implicit") as front:
                account = clients.Account(front.port, "bob@example.test", "bobpw",
                                          "implicit", str(other), "localhost")
                with pytest.raises(clients.ClientError, match="certificate"):
                    clients.mbsync_sync(account, work)
        else:
            mf: imapserve.Mailfort = request.getfixturevalue("mailfort")
            good = mf.account("bob@example.test", "implicit")
            account = clients.Account(good.port, good.user, good.password, "implicit",
                                      str(other), good.host)
            with pytest.raises(clients.ClientError, match="certificate"):
                clients.mbsync_sync(account, work)
