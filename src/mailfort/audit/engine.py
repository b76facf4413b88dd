"""Run the registered checks against one target and build the report (a plain dict).

The report dict is the single source of every output: ``--json`` prints it, the terminal
table and the HTML page render it. Its shape is :data:`mailfort.audit.schema.SCHEMA`.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from mailfort.audit import catalogue
from mailfort.audit.client import BudgetSpent, NoReply, ProbeError, RawClient
from mailfort.audit.context import IMPLICIT_TLS, SMTP_SERVICES, Context, Target
from mailfort.audit.registry import (
    FAIL,
    INCONCLUSIVE,
    SKIP,
    STATUSES,
    Check,
    Stop,
    Verdict,
    all_checks,
)

SCHEMA_ID = "mailfort-audit/1"


# Exit statuses, for scripts and cron jobs: a run that could not tell is not "all fine".
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3


def exit_status(summary: dict[str, int]) -> int:
    """1 if anything FAILs, else 3 if anything is INCONCLUSIVE, else 0 (PASS, WARN, SKIP)."""
    if summary.get(FAIL):
        return EXIT_FAIL
    return EXIT_INCONCLUSIVE if summary.get(INCONCLUSIVE) else EXIT_OK


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class Unreachable(Exception):
    """No port of the target answers: exit status 2."""


def select(only: Iterable[str] | None) -> list[Check]:
    """The checks to run: all, or those named (an id or a prefix such as ``tls``)."""
    checks = all_checks()
    if not only:
        return checks
    chosen: list[Check] = []
    for name in only:
        hits = [c for c in checks if c.id == name or c.id.startswith(name + ".")]
        if not hits:
            raise UsageError(f"no check {name!r} (see --list)")
        chosen += [c for c in hits if c not in chosen]
    return sorted(chosen, key=lambda c: (c.order, c.id))


def discover(ctx: Context) -> None:
    """Which given ports greet (a port that accepts but stays silent counts as closed, one
    whose implicit TLS handshake fails counts as open);
    note the software a SMTP greeting names. The ports are asked at once, each for one
    greeting line within ``min(timeout, 5)`` and the run's budget: a server that greets
    slowly costs one wait, not one per port."""
    t = ctx.target
    wait = min(t.timeout, 5.0)
    greetings: dict[str, str] = {}

    def ask(service: str, port: int) -> None:
        try:
            c = RawClient(t.host, port, wait, [], deadline=ctx.deadline)
        except (ProbeError, BudgetSpent):
            return
        try:
            if service in IMPLICIT_TLS:
                try:
                    c.starttls()
                except NoReply:
                    return
                except ProbeError:  # it answered, with a broken handshake: open, and
                    greetings[service] = ""  # the TLS checks say what is wrong with it
                    return
            greetings[service] = c.read_line(wait).decode("latin-1")
        except (ProbeError, BudgetSpent):
            return
        finally:
            c.close()

    threads = [threading.Thread(target=ask, args=(service, port), daemon=True)
               for service, port in t.ports.items() if port]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for service, port in t.ports.items():  # in the given order, not the answering one
        if port and service in greetings:
            ctx.open_ports[service] = port
            ctx.greetings[service] = greetings[service]
            if service in SMTP_SERVICES and "postfix" in greetings[service].lower():
                ctx.software = "postfix"


def trim_evidence(lines: list[str], head: int = 40, tail: int = 10) -> list[str]:
    """The start and end of a long transcript, and every note ("  [...]") between."""
    if len(lines) <= head + tail + 10:
        return list(lines)
    middle = lines[head:-tail]
    notes = [ln for ln in middle if ln.startswith("  [")]
    return [*lines[:head], f"  … {len(middle) - len(notes)} lines omitted", *notes,
            *lines[-tail:]]


def _run_one(ctx: Context, chk: Check) -> Verdict:
    if ctx.remaining() <= 0:
        return Verdict(SKIP, "budget.spent")
    try:
        return chk.probe(ctx)
    except Stop as stop:
        return stop.verdict
    except BudgetSpent:
        return Verdict(INCONCLUSIVE, "budget.cut", {"budget": f"{ctx.target.budget:g}"})
    except (ProbeError, OSError) as exc:
        return Verdict(INCONCLUSIVE, "probe.error", {"error": str(exc)[:200]})
    except Exception as exc:  # a bug in one check must not end the audit
        ctx.evidence.append("  [" + traceback.format_exc(limit=2).strip()[-300:] + "]")
        return Verdict(INCONCLUSIVE, "internal.error", {"error": repr(exc)[:200]})


def run(target: Target, *, only: Iterable[str] | None = None, lang: str = "en",
        progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Audit ``target``; raises UsageError or Unreachable (exit 2) before any check runs."""
    cat = catalogue.load(lang)
    checks = select(only)
    ctx = Context(target)
    discover(ctx)
    if not ctx.open_ports and not all(c.id.startswith("dns.") for c in checks):
        given = ", ".join(f"{s} {p}" for s, p in target.ports.items() if p)
        raise Unreachable(f"{target.host}: no port answers ({given or 'none given'})")
    started = dt.datetime.now(dt.UTC)
    results: list[dict[str, Any]] = []
    for i, chk in enumerate(checks):
        if progress:
            progress(i, len(checks), chk.id)
        ctx.evidence = []
        t0 = time.monotonic()
        verdict = _run_one(ctx, chk)
        text = cat.CHECKS[chk.id]
        results.append({
            "id": chk.id,
            "row": chk.row,
            "title": text["title"],
            "status": verdict.status,
            "result": catalogue.note(cat, verdict.note, verdict.params),
            "note_key": verdict.note,
            "evidence": trim_evidence(ctx.evidence),
            "why": text["why"],
            "fix": text["fix"],
            "fix_postfix": text["postfix"] if ctx.software == "postfix" else None,
            "duration_s": round(time.monotonic() - t0, 3),
        })
    if progress:
        progress(len(checks), len(checks), "")
    summary = {s: sum(1 for r in results if r["status"] == s) for s in STATUSES}
    return {
        "schema": SCHEMA_ID,
        "tool": "mailfort audit",
        "lang": lang,
        "target": {
            "host": target.host,
            "ports": {s: p for s, p in target.ports.items() if p},
            "open_ports": dict(ctx.open_ports),
            "domain": target.domain,
            "user": target.user,
            "software": ctx.software,
        },
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - ctx.started, 3),
        "summary": summary,
        "exit_status": exit_status(summary),
        "checks": results,
    }


def resolve_host(host: str) -> None:
    """UsageError-free check that the host name resolves; Unreachable otherwise."""
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise Unreachable(f"{host}: {exc}") from exc
