"""VRFY and EXPN that disclose accounts: the lab's legacy profile only.

Hardened mailfort answers VRFY with 252 and EXPN with 502 for everything (in the engine,
``protocol.smtp``), so a stranger cannot list the users or learn where an alias really
leads. ``DirectoryDisclosure`` is the old behaviour that the lab's legacy server shows:
VRFY confirms users (250) and denies the rest (550), EXPN expands aliases, remote
forwards included. It is set in Python only (server/profile.py), never by a config.
"""

from __future__ import annotations

from mailfort.directory.base import Directory
from mailfort.protocol.replies import NO_SUCH_USER, Reply


class DirectoryDisclosure:
    """An ``AccountLookup`` answering from the directory (names without @ are local to
    ``domain``)."""

    def __init__(self, directory: Directory, domain: str) -> None:
        self.directory = directory
        self.domain = domain

    def _address(self, arg: str) -> str:
        name = arg.strip().strip("<>").strip()
        return name if "@" in name else f"{name}@{self.domain}"

    def _targets(self, address: str) -> tuple[str, ...] | None:
        if "@" not in address or not self.directory.is_local_domain(address.rpartition("@")[2]):
            return None
        try:
            found = self.directory.resolve(address)
        except ValueError:
            return None
        return None if found is None else found.local + found.remote

    def vrfy(self, arg: str) -> Reply:
        address = self._address(arg)
        targets = self._targets(address)
        if targets is None:
            return NO_SUCH_USER
        if self.directory.password_hash(address) is not None:
            return Reply(250, "2.1.5", f"<{address}>")
        return Reply(250, "2.1.5", tuple(f"<{t}>" for t in targets))

    def expn(self, arg: str) -> Reply:
        targets = self._targets(self._address(arg))
        if targets is None:
            return NO_SUCH_USER
        return Reply(250, "2.1.5", tuple(f"<{t}>" for t in targets))
