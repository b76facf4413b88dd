"""A real ``mailfort serve`` with ``[listen] imap`` (STARTTLS) and ``imaps`` (implicit TLS) on
free loopback ports, a trustme certificate for ``localhost`` and 127.0.0.1, users alice and
bob, mail delivered over SMTP to its MX; and the reference Dovecot's bob, reset, for the
same client runs. Shared by test_imap_clients.py and test_imap_differential.py.

Until this branch has the IMAP server, the configuration is refused (``listen.imap: unknown
key``): ``start`` then skips the test with that reason, read from the real config loader,
never assumed.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import shutil
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mailfort import config as config_mod
from mailfort.store.maildir import maildir_for
from tests import imapscript
from tests.conftest import refusing_dns_port
from tests.imapclients import Account, read_message
from tests.server.production import Server, cli, free_port, serving, world_dir, write_config

PASSWORDS = {"alice@example.test": "alice-imap-pw1", "bob@example.test": "bob-imap-pw1"}
DOVECOT_PASSWORDS = {"alice@example.test": "alicepw", "bob@example.test": "bobpw"}
DOVECOT_POP3 = 11110


@dataclass
class Mailfort:
    server: Server
    root: Path
    ports: dict[str, int]
    cafile: Path

    def account(self, user: str, tls: str) -> Account:
        """How a client reaches this server: "starttls" on imap, "implicit" on imaps; the
        name "localhost" (mbsync checks DNS names only, not IP addresses)."""
        port = self.ports["imaps" if tls == "implicit" else "imap"]
        return Account(port, user, PASSWORDS[user], tls, str(self.cafile), "localhost")

    def maildir(self, user: str) -> Path:
        return maildir_for(self.root / "data" / "mail", user)

    def files(self, user: str) -> set[Path]:
        md = self.maildir(user)
        return {p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()}

    def by_unique(self, user: str) -> dict[str, Path]:
        """The files of new/ and cur/ by Maildir unique name (a file a session moves from
        new/ to cur/ between the two listings is one message, not two)."""
        return {p.name.partition(":")[0]: p for p in self.files(user)}

    def deliver(self, user: str, data: bytes) -> bytes:
        """``data`` over SMTP to the MX; the bytes as stored (with the trace headers)."""
        before = set(self.by_unique(user))
        with smtplib.SMTP("127.0.0.1", self.ports["mx"], timeout=20) as smtp:
            smtp.ehlo("client.remote.test")
            smtp.sendmail("sender@remote.test", [user], data)
        new = set(self.by_unique(user)) - before
        assert len(new) == 1, f"one new file expected in {user}'s Maildir, got {new}"
        unique = new.pop()
        for _ in range(20):  # an IDLE session may move it to cur/ while we read
            path = self.by_unique(user).get(unique)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    return path.read_bytes()
        raise AssertionError(f"{unique} vanished from {user}'s Maildir")

    def stored(self, user: str, message_id: str) -> bytes:
        """The stored copy of one message, by Message-ID (without brackets)."""
        for _ in range(3):  # a file moved from new/ to cur/ meanwhile: list again
            for f in self.files(user):
                try:
                    data = f.read_bytes()
                except FileNotFoundError:
                    continue
                if read_message(data, set()).message_id == message_id:
                    return data
        raise AssertionError(f"{message_id} not stored for {user}")

    def pop3_ids(self, user: str) -> list[str]:
        """Message-IDs POP3 shows in the maildrop (POP3S, the certificate checked)."""
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        pop = poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], context=ctx, timeout=20)
        return _pop3_ids(pop, user, PASSWORDS[user])

    def imap(self, user: str) -> imaplib.IMAP4:
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        imap = imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=ctx,
                                 timeout=20)
        imap.login(user, PASSWORDS[user])
        return imap


def _pop3_ids(pop: poplib.POP3, user: str, password: str) -> list[str]:
    try:
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        ids = []
        for n in range(1, count + 1):
            _, lines, _ = pop.top(n, 0)
            ids.append(read_message(b"\r\n".join(lines), set()).message_id)
        return sorted(ids)
    finally:
        pop.quit()


def cert_files(ca: trustme.CA, where: Path) -> tuple[Path, Path, Path]:
    """(certificate chain, key, CA) for localhost and 127.0.0.1, with a CN (some clients
    read the CN)."""
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    chain, key, cafile = where / "imap-cert.pem", where / "imap-key.pem", where / "imap-ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(cafile))
    for p in (chain, key, cafile):
        p.chmod(0o644)
    return chain, key, cafile


@contextmanager
def start(ca: trustme.CA, **tables: dict[str, object]) -> Iterator[Mailfort]:
    """``mailfort serve`` with IMAP and IMAPS, or skip (the reason from the config loader);
    ``tables``: more configuration (``limits={...}``)."""
    root = world_dir()
    try:
        chain, key, cafile = cert_files(ca, root)
        listen = {"imap": [f"127.0.0.1:{free_port()}"], "imaps": [f"127.0.0.1:{free_port()}"]}
        config = write_config(root, refusing_dns_port(), listen=listen,
                              tls={"cert_file": str(chain), "key_file": str(key)},
                              sender_auth={"enabled": False}, **tables)
        try:
            cfg = config_mod.load(config)
        except config_mod.ConfigError as exc:
            if "imap" not in str(exc):
                raise
            pytest.skip(f"mailfort serve refuses [listen] imap/imaps ({exc}): its IMAP "
                        "server is not on this branch yet")
        ports = {name: int(getattr(cfg.listen, name)[0].rpartition(":")[2])
                 for name in ("mx", "submission", "pop3s", "imap", "imaps")}
        pw = root / "pw"
        for args in [("domain", "add", "example.test")] + [
                ("user", "add", user, "--password-file", str(pw)) for user in PASSWORDS]:
            if args[0] == "user":
                pw.write_text(PASSWORDS[args[2]] + "\n")
            r = cli(config, *args)
            assert r.returncode == 0, r.stderr
        pw.unlink()
        with serving(config, root / "data") as srv:
            yield Mailfort(srv, root, ports, cafile)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ the reference Dovecot

DOVECOT_BOB = imapscript.DOVECOT_ROOT / "bob"


def dovecot_account(port: int, user: str = "bob@example.test") -> Account:
    return Account(port, user, DOVECOT_PASSWORDS[user])


def dovecot_reset(port: int, user: str = "bob@example.test",
                  folders: tuple[str, ...] = ("INBOX", "Archive")) -> None:
    """Empty ``folders`` of ``user`` at the reference Dovecot, over IMAP (its indexes stay
    consistent), creating them when missing. Bob's mailbox is used by these tests only."""
    local = user.split("@")[0]
    base = imapscript.DOVECOT_ROOT / local
    for d in [base, *(base / f".{f}" for f in folders if f != "INBOX")]:
        for sub in ("", "cur", "new", "tmp"):
            if not (d / sub).exists():
                (d / sub).mkdir(parents=True)
                os.chown(d / sub, *imapscript.VMAIL)
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        imap.login(user, DOVECOT_PASSWORDS[user])
        for folder in folders:
            typ, data = imap.select(folder)
            assert typ == "OK", data
            if data[0] != b"0":
                imap.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
                imap.expunge()
    finally:
        imap.logout()


def dovecot_deliver(messages: list[bytes], user: str = "bob@example.test") -> None:
    base = imapscript.DOVECOT_ROOT / user.split("@")[0]
    for n, data in enumerate(messages):
        imapscript.maildir_put(base, data, n, imapscript.VMAIL)


def dovecot_pop3_ids(user: str = "bob@example.test") -> list[str]:
    return _pop3_ids(poplib.POP3("127.0.0.1", DOVECOT_POP3, timeout=20), user,
                     DOVECOT_PASSWORDS[user])


def imap_state(imap: imaplib.IMAP4, folders: tuple[str, ...] = ("INBOX", "Archive")
               ) -> dict[str, dict[str, set[str]]]:
    """folder -> {Message-ID: flags} as the server tells them (\\Recent left out)."""
    out: dict[str, dict[str, set[str]]] = {}
    try:
        for folder in folders:
            typ, data = imap.select(folder, readonly=True)
            assert typ == "OK", (folder, data)
            out[folder] = {}
            if data[0] == b"0":
                continue
            typ, data = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert typ == "OK", data
            for item in data:
                if not isinstance(item, tuple):
                    continue
                flags = imaplib.ParseFlags(item[0])
                mid = read_message(item[1], set()).message_id
                out[folder][mid] = {f.decode() for f in flags} - {"\\Recent"}
    finally:
        imap.logout()
    return out
