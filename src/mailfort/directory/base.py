"""The directory interface: domains, users, aliases, password hashes.

Protocol and policy code depend only on this interface, so that the embedded SQLite
directory can later be swapped for a shared engine (PostgreSQL) without touching them.
Addresses handed in are already syntactically valid; lookups are case-insensitive on the
domain and exact (case-preserving but compared case-insensitively) on the local part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Resolution:
    """Where mail for one address goes: local mailboxes and remote addresses."""

    local: tuple[str, ...]  # canonical user addresses ("alice@example.test")
    remote: tuple[str, ...]  # addresses on foreign domains (forwarded via the queue)


class Directory(Protocol):
    def is_local_domain(self, domain: str) -> bool: ...

    def resolve(self, address: str) -> Resolution | None:
        """Expand aliases (recursively, with a depth limit) and catch-alls.

        None when the address is not deliverable here (unknown user on a local domain,
        or a domain that is not local).
        """

    def password_hash(self, user: str) -> str | None:
        """The argon2id hash of a user's password, None for an unknown user."""

    def addresses_of(self, user: str) -> frozenset[str]:
        """Addresses the user may send as: their own, plus aliases that lead to them."""


def is_blocking(directory: object) -> bool:
    """Whether the directory's lookups are network round trips (PostgreSQL), which the
    server must run off the event loop. The embedded SQLite directory's are indexed reads
    of a local file, cheap enough to stay on the loop as they always have."""
    return bool(getattr(directory, "blocking", False))


async def lookup(directory: object, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (a method of ``directory``), in a thread when the directory blocks."""
    if is_blocking(directory):
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
