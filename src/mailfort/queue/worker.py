"""The delivery worker: takes due queue entries to their destinations, retries, bounces.

Per pass, the due entries are lined up oldest first and ``cfg.queue.workers`` runner
tasks take them one at a time; each entry's active recipients are grouped by domain and
every domain gets one connection (also bounded overall by ``cfg.queue.workers``). So
after an outage, with thousands of entries due, the worker holds at most that many
entries, connections and open message files, never the whole due queue. A message is
streamed from its file to the remote (``delivery.client``), never read whole. Each
recipient keeps its own state, so one failing recipient among ten is the only one retried.

One destination domain holds at most ``cfg.queue.destination_concurrency`` connections:
recipients of a domain at its limit are not attempted (no attempt is counted) and their
entry is parked until a connection to that domain ends, so a silent or slow destination
ties up a few runners, never all of them, and the other domains keep flowing.

Bounce rules (against backscatter, weakness 3 in mailfort.weaknesses): a DSN is made only for
an entry with ``submitted_by`` set (mail an authenticated local user submitted), only to
that local user (never to the envelope sender string, which could name anyone), never when
the envelope sender is null, and it is handed to ``local_deliver`` — it never leaves this
server. A failed recipient stays marked ``notified=False`` until its bounce was delivered,
so a crash between the two sends the bounce after restart rather than losing it. Each DSN
has a key that is the same on that resend (the entry, how many DSNs it already sent, and
the time of the attempt it reports, all in the saved state), and ``local_deliver`` stores a
key once: the resend after such a crash finds the first copy and adds none.

Forwarded mail (an alias of ours to a remote address, queue/forward.py) that fails for
good is told to the alias's owner: the postmaster of the alias's domain, as resolved by
the directory to local mailboxes (aliases are the domain administrator's, and their
targets may all be remote). Never the outside sender. It is kept unnotified, like a
bounce, until that notice is stored; each such failure, and every permanent failure that
no one is told of (mail from outside, a null sender), is also a log line with its reason.

The log follows a message as Postfix's does (README, "Delivery log"): one line per recipient
per attempt (``attempt_line``: relay, delays, TLS, enhanced status, the reply or the local
reason), one per DSN sent (with the DSN's own id, ``dsn_id``), one when the entry is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from mailfort import metrics
from mailfort.config import Config
from mailfort.delivery import client, mx, tlsrpt_send
from mailfort.delivery.message import Outbound, Traits, scan_file
from mailfort.delivery.outbound_tls import OutboundTLS
from mailfort.delivery.tlspolicy import static_policy
from mailfort.directory.base import Directory, lookup
from mailfort.queue.dsn import MAX_ORIGINAL_HEADERS, RecipientReport, build_dsn
from mailfort.queue.store import Entry, Queue, QueueError, Recipient
from mailfort.store.maildir import Committer, in_maildir, keyed_name, maildir_for

log = logging.getLogger("mailfort.queue")

# (user, message, key): store the message for the user, once per key (see maildir_deliverer)
LocalDeliver = Callable[[str, bytes, str], Awaitable[None]]
# (domain, targets, sender, recipients, message) -> DomainResult; replaceable for the lab.
Deliverer = Callable[..., Awaitable[client.DomainResult]]

_MAX_SLEEP = 60.0  # rescan at least this often (picks up `mailfort queue retry` from the CLI)
_FULL_SCAN_EVERY = _MAX_SLEEP - 1.0  # seconds between reads of every state file
# Seconds a stopping worker lets deliveries in flight finish (most are past DATA in
# milliseconds; a stalled remote is cut off at the end).
STOP_GRACE = 3.0
_RECOVER_GRACE = 60.0  # see Queue.recover: safe while the SMTP services already enqueue
_PARK_RECHECK = 5.0  # a parked entry is looked at again after this, woken or not


@dataclass
class PassStats:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    bounces: int = 0
    warnings: int = 0


def backoff(cfg: Config, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed ones: doubling, capped."""
    q = cfg.queue
    return float(min(q.initial_retry * (2 ** max(attempts - 1, 0)), q.max_retry))


def may_bounce(entry: Entry) -> bool:
    """Only an authenticated local submitter ever gets a DSN, never a null sender."""
    return bool(entry.submitted_by) and entry.sender not in ("", "<>")


class DeliveryWorker:
    """Background delivery of the outbound queue; ``start``/``stop`` inside an event loop."""

    def __init__(
        self,
        queue: Queue,
        cfg: Config,
        local_deliver: LocalDeliver,
        *,
        mx_port: int = mx.SMTP_PORT,
        clock: Callable[[], float] = time.time,
        directory: Directory | None = None,
    ) -> None:
        """``directory``: where the owners of forwarding aliases are found; without one a
        failed forward is only logged."""
        self.queue = queue
        self.directory = directory
        self.cfg = cfg
        self.local_deliver = local_deliver
        self.mx_port = mx_port
        self.clock = clock
        self.hostname = cfg.server.hostname
        self._resolver = mx.make_resolver(cfg)
        self._tls = OutboundTLS(cfg, self._resolver)  # outbound TLS policy (issue 13)
        self._tlsrpt_task: asyncio.Task[None] | None = None  # issue 13
        self._slots = max(1, cfg.queue.workers)
        self._sem = asyncio.Semaphore(self._slots)  # connections
        self._ready: deque[str] = deque()  # due entries not yet taken, oldest first
        self._runners: set[asyncio.Task[None]] = set()  # at most self._slots
        self._inflight: set[str] = set()  # entries a runner is processing
        self._sleep_until: float | None = None  # when the loop wakes by itself
        self._cooldown: dict[str, float] = {}  # entries whose processing crashed: not before
        self._per_destination = max(1, cfg.queue.destination_concurrency)
        self._busy: dict[str, int] = {}  # destination domain -> connections open to it
        self._waiting: dict[str, set[str]] = {}  # domain at its limit -> entries parked on it
        self._parked: dict[str, float] = {}  # parked entry -> when to look again anyway
        # When each known entry is next due. Processing an entry updates it in memory, so a
        # pass reads state files only for entries it has not seen (after ``wake``) and, every
        # _FULL_SCAN_EVERY seconds, all of them (what the CLI changed): a queue of thousands
        # of deferred messages costs no full read per delivery.
        self._schedule: dict[str, float] = {}
        self._new_mail = True
        self._last_full_scan: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.stats = PassStats()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover the queue directory and start the loop (one pass runs at once)."""
        damaged = await asyncio.to_thread(self.queue.damaged)  # set aside before this start
        await asyncio.to_thread(self.queue.recover, _RECOVER_GRACE)  # logs what it sets aside
        if damaged:  # once per start, so that a restart does not hide them
            log.warning("queue: %d damaged entr%s kept in %s, not delivered: %s; see "
                        "`mailfort queue list`", len(damaged), "y" if len(damaged) == 1
                        else "ies", self.queue.corrupt_dir,
                        ", ".join(d.id for d in damaged[:10]) + (", ..." if damaged[10:] else ""))
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._last_full_scan = None  # whatever happened while stopped: read it all
        self._parked.clear()  # nothing is in flight now: no destination is busy
        self._waiting.clear()
        self._task = asyncio.create_task(self._run(), name="mailfort-delivery")
        # --- TLS-RPT (issue 13): yesterday's reports, once a day, through this queue
        if self.cfg.delivery.tls_reports:
            self._tlsrpt_task = asyncio.create_task(
                tlsrpt_send.daily(self.cfg, self.queue.enqueue_bytes, self._resolver, self.wake),
                name="mailfort-tlsrpt")
        # --- end TLS-RPT

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop: no new delivery starts; those in flight get ``grace`` seconds to finish and
        record their outcome (a remote 250 not yet written down would be delivered again
        after the next start: a duplicate), then are cancelled and retried after it."""
        # The flag and the cancel both stop the loop: a cancel alone can be lost in a race
        # with a wake-up (asyncio.wait_for on Python 3.11 swallows it; the loop no longer
        # uses wait_for, the flag guards what else might). asyncio.wait, unlike awaiting
        # the task, lets a cancellation of stop() itself through.
        self._stopping = True
        # --- TLS-RPT (issue 13)
        rpt, self._tlsrpt_task = self._tlsrpt_task, None
        if rpt is not None:
            rpt.cancel()
            await asyncio.wait([rpt])
        # --- end TLS-RPT
        task, self._task = self._task, None
        self._ready.clear()
        await _cancel_until_done([task] if task is not None else [])
        self._ready.clear()
        if self._runners and grace > 0:
            await asyncio.wait(list(self._runners), timeout=grace)
        await _cancel_until_done(list(self._runners))

    def wake(self) -> None:
        """New mail was queued: look for it now. Callable from any thread."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._mark_new()
        else:
            self._loop.call_soon_threadsafe(self._mark_new)

    def rescan(self) -> None:
        """Read every state file again at once (the operator changed some: ``mailfort
        queue retry``), instead of at the next full pass. Callable from any thread."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._rescan_now()
        else:
            self._loop.call_soon_threadsafe(self._rescan_now)

    def _rescan_now(self) -> None:
        self._last_full_scan = None
        self._mark_new()

    def _mark_new(self) -> None:
        self._new_mail = True
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                next_due = await self.run_pass()
            except Exception:  # never let one bad pass stop delivery for good
                log.exception("delivery pass failed")
                next_due = self.clock() + 5.0
            delay = _MAX_SLEEP if next_due is None else next_due - self.clock()
            delay = min(max(delay, 0.0), _MAX_SLEEP)
            self._sleep_until = self.clock() + delay
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            finally:
                self._sleep_until = None

    # ------------------------------------------------------------------ passes

    async def run_pass(self) -> float | None:
        """Line up every due entry not already in flight; returns the next due time.

        At most ``cfg.queue.workers`` runner tasks process the line, one entry each at a
        time; ``drain`` waits for them (tests).
        """
        now = self.clock()
        full = self._last_full_scan is None or now - self._last_full_scan >= _FULL_SCAN_EVERY
        if full or self._new_mail:
            self._new_mail = False
            known = None if full else set(self._schedule) | self._inflight
            ids, entries = await asyncio.to_thread(self._scan, known)
            if full:
                self._last_full_scan = now
            present = set(ids)
            for ident in [i for i in self._schedule if i not in present]:
                del self._schedule[ident]  # deleted from outside (CLI)
                await asyncio.to_thread(self._log_deleted, ident)
            for entry in entries:
                if entry.id not in self._inflight:  # its task will tell
                    self._reschedule(entry)
        next_due: float | None = None
        ready: list[tuple[float, str]] = []
        for ident, due in self._schedule.items():
            if ident in self._inflight:
                continue
            due = max(due, self._not_before(ident))
            if due <= now:
                ready.append((due, ident))
            else:
                next_due = due if next_due is None else min(next_due, due)
        ready.sort()
        self._ready = deque(ident for _, ident in ready)
        while self._ready and len(self._runners) < self._slots:
            task = asyncio.create_task(self._runner())
            self._runners.add(task)
            task.add_done_callback(self._runners.discard)
        return next_due

    async def _runner(self) -> None:
        """Process lined-up entries one at a time until the line is empty."""
        while self._ready and not self._stopping:
            ident = self._ready.popleft()
            if ident in self._inflight:
                continue
            self._inflight.add(ident)
            try:
                await self._process(ident)
            finally:
                self._inflight.discard(ident)
            self._done(ident)

    def _scan(self, known: set[str] | None) -> tuple[list[str], list[Entry]]:
        """Every id, and the state of the unknown ones (all of them if ``known`` is None)."""
        ids = self.queue.ids()
        entries = []
        for ident in ids:
            if known is None or ident not in known:
                # A damaged entry is set aside (and logged) by get: it costs only itself.
                with contextlib.suppress(QueueError):
                    entries.append(self.queue.get(ident))
        return ids, entries

    def _log_deleted(self, ident: str) -> None:
        """An entry this worker had scheduled is gone and was not set aside as damaged:
        `mailfort queue delete` (the CLI works on the files, so the server says it)."""
        with contextlib.suppress(QueueError):
            if self.queue.damaged_entry(ident) is not None:
                return
        log.info("queue %s: removed (deleted by the operator)", ident)

    def _reschedule(self, entry: Entry) -> None:
        """Note when the entry is next due (or forget it when nothing is left to do)."""
        due = entry.next_attempt
        if due is None:
            self._schedule.pop(entry.id, None)
        else:
            self._schedule[entry.id] = due

    def _done(self, ident: str) -> None:
        """An entry was processed: wake the loop if it is due before the loop would wake
        by itself (an entry in flight was left out of the last pass's next due time)."""
        due = self._schedule.get(ident)
        if due is None:
            return
        due = max(due, self._not_before(ident))
        if self._sleep_until is None or due < self._sleep_until:
            self._wake.set()

    def _not_before(self, ident: str) -> float:
        return max(self._cooldown.get(ident, 0.0), self._parked.get(ident, 0.0))

    def _take_destination(self, domain: str, ident: str) -> bool:
        """Count a connection to ``domain``, or park the entry if it is at its limit."""
        busy = self._busy.get(domain, 0)
        if busy >= self._per_destination:
            self._waiting.setdefault(domain, set()).add(ident)
            self._parked[ident] = self.clock() + _PARK_RECHECK
            return False
        self._busy[domain] = busy + 1
        return True

    def _release_destination(self, domain: str) -> None:
        """A connection to ``domain`` ended: the entries parked on it are due again."""
        busy = self._busy.get(domain, 0) - 1
        if busy > 0:
            self._busy[domain] = busy
        else:
            self._busy.pop(domain, None)
        waiters = self._waiting.pop(domain, set())
        for ident in waiters:
            self._parked.pop(ident, None)
        if waiters:
            self._wake.set()

    async def drain(self) -> None:
        """Wait until every lined-up entry has been processed."""
        while self._runners:
            await asyncio.gather(*list(self._runners), return_exceptions=True)

    async def _process(self, ident: str) -> None:
        try:
            await self._process_entry(ident)
        except Exception:
            # A bug or a disk error must not turn into a busy loop over the same entry.
            log.exception("queue %s: processing failed; retrying later", ident)
            self._cooldown[ident] = self.clock() + max(self.cfg.queue.initial_retry, 1.0)
        else:
            self._cooldown.pop(ident, None)

    async def _process_entry(self, ident: str) -> None:
        self._parked.pop(ident, None)
        try:
            entry = await asyncio.to_thread(self.queue.get, ident)
        except QueueError:  # deleted meanwhile (`mailfort queue delete`), or damaged
            if self._schedule.pop(ident, None) is not None:
                await asyncio.to_thread(self._log_deleted, ident)
            return
        self._reschedule(entry)  # as it is on disk, whatever happens below
        path = self.queue.message_path(ident)
        try:
            traits = await asyncio.to_thread(_traits_of, path, entry)
        except FileNotFoundError:  # gone since get() looked: damaged too
            self._schedule.pop(ident, None)
            await asyncio.to_thread(self.queue.set_aside, ident, "message file missing")
            return
        now = self.clock()
        due = [r for r in entry.active if r.next_attempt <= now]
        wanted: dict[str, list[Recipient]] = {}
        for r in due:
            wanted.setdefault(r.domain, []).append(r)
        # Counted before the first await, so two entries never both take the last one.
        by_domain = {d: rs for d, rs in wanted.items() if self._take_destination(d, ident)}
        if wanted and not by_domain:
            return  # every destination is at its limit: parked, nothing attempted
        try:
            results = await asyncio.gather(
                *(self._deliver_domain(entry, d, rs, path, traits)
                  for d, rs in by_domain.items())
            )
        finally:
            for d in by_domain:
                self._release_destination(d)
        now = self.clock()
        expiry = entry.created + self.cfg.queue.max_lifetime
        for domain_result, timing in results:
            for r in by_domain_lookup(entry, domain_result):
                res = domain_result.results[r.address]
                metrics.DELIVERIES.labels(res.outcome).inc()
                # Tried before its time by `queue retry`: the schedule stays as it was.
                early = r.retry_at > now
                scheduled, r.retry_at = r.retry_at, 0.0
                r.attempts += 1
                if early:
                    r.early += 1
                r.last_attempt = now
                r.last_reply = res.reply
                r.status = res.status
                r.remote_mta = res.remote_mta
                if res.outcome == "delivered":
                    r.state = "delivered"
                    self.stats.delivered += 1
                    word = "sent"
                elif res.outcome == "permanent":
                    r.state = "failed"
                    self.stats.failed += 1
                    word = "bounced"
                elif now >= expiry:
                    r.state = "failed"
                    r.status = "4.4.7"
                    r.last_reply = f"message expired in queue; last reply: {res.reply}"
                    self.stats.failed += 1
                    word = "expired"
                else:
                    r.state = "deferred"
                    later = scheduled if early else \
                        now + backoff(self.cfg, r.attempts - r.early)
                    r.next_attempt = min(later, expiry)
                    self.stats.deferred += 1
                    word = "deferred"
                log_attempt(entry, r, domain_result, word, timing)
                if r.state == "failed":
                    self._log_failure(entry, r)
        if not may_bounce(entry):
            for r in entry.unnotified:
                if r.address not in entry.forwards:  # the alias's owner is told (_notify)
                    r.notified = True
        try:
            await self._save(entry)
            await self._notify(entry, now)
        except QueueError:  # deleted meanwhile
            if self._schedule.pop(ident, None) is not None:
                await asyncio.to_thread(self._log_deleted, ident)
            return
        self._reschedule(entry)

    async def _deliver_domain(
        self, entry: Entry, domain: str, rcpts: list[Recipient], path: Path, traits: Traits
    ) -> tuple[client.DomainResult, Timing]:
        addrs = [r.address for r in rcpts]
        async with self._sem:  # the slot first: only then is the message opened
            started = time.time()
            t0 = time.monotonic()
            try:
                targets = await mx.resolve(domain, self.cfg, port=self.mx_port,
                                           resolver=self._resolver)
            except mx.LookupFailure as exc:
                outcome: client.Outcome = "permanent" if exc.permanent else "temporary"
                reply = f"{exc.status} {exc.message}"
                out = client.DomainResult()
                for a in addrs:
                    out.results[a] = client.RcptResult(a, outcome, reply, exc.status)
                return out, Timing(started, time.monotonic() - t0, 0.0, 0.0)
            route = mx.route_for(self.cfg, domain)
            try:
                message = await asyncio.to_thread(Outbound.from_file, path, traits)
            except FileNotFoundError:  # deleted meanwhile (CLI): the save below says so
                out = client.DomainResult()
                for a in addrs:
                    out.results[a] = client.RcptResult(a, "temporary",
                                                       "4.3.0 message file missing", "4.3.0")
                return out, Timing(started, time.monotonic() - t0, 0.0, 0.0)
            # --- outbound TLS policy (issue 13): floor, per-domain level, DANE, MTA-STS.
            # "TLS-Required: No" (RFC 8689 §4.2.2): the sender waives the destination's
            # MTA-STS and DANE; our own configured levels still hold.
            if entry.tls_optional and not entry.requiretls:
                policy = static_policy(self.cfg, domain, route)
            else:
                policy = await self._tls.policy_for(domain, route, targets)
            # --- end outbound TLS policy
            t1 = time.monotonic()
            res = await client.deliver(
                targets,
                entry.sender,
                addrs,
                message,
                helo=self.hostname,
                require_tls=mx.requires_tls(self.cfg, domain, route),
                connect_timeout=self.cfg.queue.connect_timeout,
                timeout=self.cfg.queue.command_timeout,
                policy=policy,  # issue 13
                report=self._tls.report,  # issue 13: TLS-RPT events
                requiretls=entry.requiretls,  # RFC 8689
                route=route,  # smarthost: implicit TLS, AUTH (issue 27)
            )
            t2 = time.monotonic()
        for a in addrs:  # belt and braces: every recipient gets a result
            res.results.setdefault(a, client.RcptResult(a, "temporary", "4.4.1 no result",
                                                        "4.4.1"))
        mail_at = res.mail_at if t1 <= res.mail_at <= t2 else t2
        return res, Timing(started, t1 - t0, mail_at - t1, t2 - mail_at)

    async def _save(self, entry: Entry) -> None:
        if entry.finished:
            await asyncio.to_thread(self.queue.delete, entry.id)
            log.info("queue %s: removed (%s)", entry.id, removal_reason(entry))
        else:
            await asyncio.to_thread(self.queue.update, entry)

    def _log_failure(self, entry: Entry, r: Recipient) -> None:
        """One line per recipient that failed for good, saying who will hear of it."""
        alias = entry.forwards.get(r.address)
        if may_bounce(entry):
            told = f"bounce to {entry.submitted_by}"
        elif alias is not None:
            told = f"forwarded by {alias}: its owner (postmaster@{alias.rpartition('@')[2]}) " \
                "is told, not the sender"
        elif not entry.sender:
            told = "null sender: no bounce"
        else:
            told = "no bounce: the sender is not a local user (backscatter rule)"
        sender = entry.original_sender or entry.sender
        log.warning("queue %s: <%s> to <%s> failed: %s; %s", entry.id, sender, r.address,
                    r.last_reply, told)

    async def _owners(self, domain: str) -> tuple[str, ...]:
        """The local mailboxes of postmaster@``domain`` (RFC 5321 §4.5.1 requires one)."""
        if self.directory is None:
            return ()
        try:
            found = await lookup(self.directory, self.directory.resolve, f"postmaster@{domain}")
        except Exception:
            log.exception("looking up postmaster@%s failed", domain)
            raise
        return found.local if found is not None else ()

    async def _tell_owners(self, entry: Entry, now: float) -> None:
        """A notice of failed forwards to each alias's owner; kept unnotified (retried
        after ``initial_retry``) until stored."""
        failed = [r for r in entry.unnotified if r.address in entry.forwards]
        if not failed:
            return
        by_alias: dict[str, list[Recipient]] = {}
        for r in failed:
            by_alias.setdefault(entry.forwards[r.address], []).append(r)
        retry = False
        for alias, rs in by_alias.items():
            domain = alias.rpartition("@")[2].lower()
            try:
                owners = await self._owners(domain)
            except Exception:
                retry = True
                continue
            if not owners:
                log.error("queue %s: failed forward by %s: nobody to tell (postmaster@%s "
                          "is not a local mailbox); see the lines above", entry.id, alias,
                          domain)
            reports = [RecipientReport(r.address, "failed", r.status or "5.0.0", r.last_reply,
                                       r.remote_mta, r.last_attempt or None) for r in rs]
            told = True
            for owner in owners:
                told &= await self._send_dsn(entry, reports, now, rs, to=owner, alias=alias)
            if told:
                for r in rs:
                    r.notified = True
            else:
                retry = True
        if retry:
            entry.notify_after = now + self.cfg.queue.initial_retry
        await self._save(entry)

    async def _notify(self, entry: Entry, now: float) -> None:
        """Send the bounce for newly failed recipients and, once, the delay warning."""
        if entry.forwards and not may_bounce(entry):
            await self._tell_owners(entry, now)
        if not may_bounce(entry):
            return
        assert entry.submitted_by is not None
        expiry = entry.created + self.cfg.queue.max_lifetime
        failed = entry.unnotified
        if failed:
            reports = [
                RecipientReport(r.address, "failed", r.status or "5.0.0", r.last_reply,
                                r.remote_mta, r.last_attempt or None)
                for r in failed
            ]
            if await self._send_dsn(entry, reports, now, failed):
                for r in failed:
                    r.notified = True
                self.stats.bounces += 1
            else:
                entry.notify_after = now + self.cfg.queue.initial_retry
            await self._save(entry)
        late = now - entry.created >= self.cfg.queue.delay_warning_after
        delayed = [r for r in entry.recipients if r.state == "deferred"]
        if late and delayed and not entry.warned:
            reports = [
                RecipientReport(r.address, "delayed", r.status or "4.0.0", r.last_reply,
                                r.remote_mta, r.last_attempt or None, expiry)
                for r in delayed
            ]
            if await self._send_dsn(entry, reports, now, delayed):
                entry.warned = True
                self.stats.warnings += 1
                await self._save(entry)

    async def _send_dsn(self, entry: Entry, reports: list[RecipientReport], now: float,
                        about: list[Recipient], *, to: str | None = None,
                        alias: str = "") -> bool:
        """A DSN to ``to`` (the submitter by default), stored locally; ``alias``: it tells
        an alias's owner of forwards that failed."""
        to = to or entry.submitted_by
        assert to is not None
        sent = int(entry.extra.get("dsns", 0))
        when = int(max((r.last_attempt for r in about), default=0.0) or entry.created)
        key = f"{when}.{dsn_id(entry.id, sent)}"  # the same after a crash before the next save
        try:  # a bounce quotes the headers only: no need to read the whole message
            headers = await asyncio.to_thread(self.queue.read_headers, entry.id,
                                              MAX_ORIGINAL_HEADERS + 1)
        except QueueError:
            headers = b""
        dsn = build_dsn(
            reporting_mta=self.hostname,
            to=to,
            original=headers + b"\r\n",
            reports=reports,
            queue_id=entry.id,
            arrival=entry.created,
            now=now,
            forwarded_by=alias,
            forwarded_from=entry.original_sender or entry.sender,
        )
        try:
            await self.local_deliver(to, dsn, key)
        except Exception:
            log.exception("queue %s: DSN to %s not delivered; will retry", entry.id, to)
            return False
        entry.extra["dsns"] = sent + 1
        kind = "forward failure" if alias else \
            "delay" if reports[0].action == "delayed" else "non-delivery"
        log.info("queue %s: sender %s notification: %s to=<%s>, recipients=%d", entry.id,
                 kind, dsn_id(entry.id, sent), to, len(reports))
        return True


async def _cancel_until_done(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any is still running: a
    cancel can be lost (``asyncio.wait_for`` on Python 3.11 swallows one that races its
    result, and dnspython awaits every query through it), and a task that lost it would
    otherwise be waited for until its work ends (a delivery: up to its command timeout)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


def maildir_deliverer(committer: Committer, mail_root: Path) -> LocalDeliver:
    """A ``local_deliver`` that stores a DSN durably in the user's Maildir, as the MX does,
    under a unique name made from its key: a key already in new/ or cur/ is not stored
    again. (A copy that a POP3 client deleted meanwhile cannot be seen, and is resent.)"""

    async def deliver(user: str, message: bytes, key: str) -> None:
        maildir = maildir_for(mail_root, user)
        name = keyed_name(key)
        if await asyncio.to_thread(in_maildir, maildir, name):
            log.info("%s already delivered to %s; not again", name, user)
            return
        spool = committer.new_spool(name)
        spool.write(message)
        await committer.commit(spool, [maildir])

    return deliver


def _traits_of(path: Path, entry: Entry) -> Traits:
    """The traits recorded at enqueue, or scanned from the file; FileNotFoundError if the
    message file is gone."""
    path.stat()
    return entry.traits or scan_file(path)


@dataclass(frozen=True)
class Timing:
    """Where an attempt's time went: ``started`` (wall clock, after waiting for a delivery
    slot), then DNS (MX and TLS policy lookups), connection setup (connect, greeting,
    EHLO, STARTTLS, over every host tried) and the transaction (MAIL to the last reply)."""

    started: float
    dns: float
    connect: float
    transaction: float


def _secs(x: float) -> str:
    """Seconds as Postfix writes them: two decimals at most, no trailing zeros."""
    return f"{max(x, 0.0):.2f}".rstrip("0").rstrip(".")


def tls_word(res: client.DomainResult) -> str:
    """``none``, ``not-verified`` or ``verified(dane|mta-sts|policy)``."""
    if not res.tls:
        return "none"
    if not res.verified:
        return "not-verified"
    return f"verified({res.verified.replace(' verify', '').replace(' ', '-')})"


def attempt_line(ident: str, r: Recipient, res: client.DomainResult, word: str,
                 created: float, timing: Timing | None) -> str:
    """The delivery log line of one recipient in one attempt (README, "Delivery log")."""
    t = timing or Timing(r.last_attempt, 0.0, 0.0, 0.0)
    wait = t.started - created
    total = wait + t.dns + t.connect + t.transaction
    relay = res.relay or "none"
    tls = tls_word(res) if res.relay else "none"
    reply = " ".join(r.last_reply.split()) or "no reply"
    return (f"queue {ident}: to=<{r.address}>, relay={relay}, delay={_secs(total)}, "
            f"delays={_secs(wait)}/{_secs(t.dns)}/{_secs(t.connect)}/"
            f"{_secs(t.transaction)}, tls={tls}, dsn={r.status or '4.0.0'}, "
            f"status={word} ({reply})")


def log_attempt(entry: Entry, r: Recipient, res: client.DomainResult, word: str,
                timing: Timing | None) -> None:
    line = attempt_line(entry.id, r, res, word, entry.created, timing)
    if word == "sent":
        log.info("%s", line)
    else:
        log.warning("%s", line)


def dsn_id(ident: str, n: int) -> str:
    """The id of the ``n``-th DSN (bounce or delay warning) about entry ``ident``: in its
    log line and in the name of its file in the recipient's Maildir."""
    return f"B{ident}N{n}"


def removal_reason(entry: Entry) -> str:
    """What became of a finished entry's recipients, e.g. "2 sent, 1 bounced"."""
    sent = sum(r.state == "delivered" for r in entry.recipients)
    expired = sum(r.state == "failed" and r.status == "4.4.7" for r in entry.recipients)
    bounced = sum(r.state == "failed" for r in entry.recipients) - expired
    parts = [f"{n} {w}" for n, w in ((sent, "sent"), (bounced, "bounced"),
                                      (expired, "expired")) if n]
    return ", ".join(parts) or "nothing left to do"


def by_domain_lookup(entry: Entry, result: client.DomainResult) -> list[Recipient]:
    """The entry's recipients that this domain result speaks for."""
    return [r for r in entry.recipients if r.active and r.address in result.results]
