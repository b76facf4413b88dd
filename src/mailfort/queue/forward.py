"""Queueing the remote recipients of one accepted message: relayed and forwarded ones.

A recipient reached through an alias of ours (``fwd@local`` -> ``someone@remote``) is a
forward. Its envelope sender is rewritten with SRS (policy/srs.py) unless it is null (a
bounce stays a bounce), one of the submitting user's own (an authenticated submission is
ours to send), or already of the forwarding domain; so SPF passes at the destination, and
a bounce comes back to us, not to whoever the outside sender claimed to be. Entries are
made per envelope sender (the message file is linked into each); a forward's entry
records the alias, whose owner the delivery worker tells of a permanent failure.

Ids: the message's id (made at DATA, in its ``Received:`` field and the 250) names the
entry of the original sender, or the first entry when every sender is rewritten; each
other entry is that id + ``S1``, ``S2``… (``mailfort queue show ID`` shows them all).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mailfort.policy.srs import SRS
from mailfort.queue.store import Queue

log = logging.getLogger("mailfort.queue")


def forward_sender(srs: SRS | None, srs_domain: str, sender: str, alias: str,
                   submitted_by: str | None) -> str:
    """The envelope sender of ``sender``'s mail forwarded by ``alias``."""
    if srs is None or not sender or submitted_by:
        return sender
    domain = srs_domain or alias.rpartition("@")[2]
    if sender.rpartition("@")[2].lower() == domain.lower():
        return sender
    try:
        rewritten = srs.forward(sender, domain)
    except (OSError, ValueError):  # the key file: forward as before SRS, and say so
        log.exception("forward by %s: SRS key unavailable; sender <%s> not rewritten",
                      alias, sender)
        return sender
    if rewritten is None:
        log.warning("forward by %s: sender <%s> not rewritten with SRS (not a plain ASCII "
                    "address, or too long); SPF may fail at the destination", alias, sender)
        return sender
    return rewritten


def enqueue_envelope(
    queue: Queue,
    srs: SRS | None,
    srs_domain: str,
    path: Path,
    sender: str,
    remote: list[str],
    forwards: dict[str, str],
    submitted_by: str | None,
    *,
    requiretls: bool = False,
    ident: str | None = None,
) -> list[str]:
    """Queue ``remote`` (``forwards``: those reached through an alias, and that alias);
    returns the ids of the entries, all durable, or none (an error takes back the ones
    made before it)."""
    groups: dict[str, list[str]] = {}
    for a in remote:
        alias = forwards.get(a)
        out = sender if alias is None else \
            forward_sender(srs, srs_domain, sender, alias, submitted_by)
        groups.setdefault(out, []).append(a)
    made: list[str] = []
    order = sorted(groups, key=lambda out: out != sender)  # the unchanged sender first
    try:
        for n, out in enumerate(order):
            rcpts = groups[out]
            made.append(queue.enqueue(
                path, out, rcpts, submitted_by, requiretls=requiretls,
                forwards={a: forwards[a] for a in rcpts if a in forwards},
                original_sender=sender if out != sender else "",
                ident=None if ident is None else ident if n == 0 else f"{ident}S{n}"))
    except BaseException:
        for ident in made:
            queue.delete(ident)
        raise
    return made
