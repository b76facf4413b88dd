"""``mailfort serve``: the entry that chooses one process or a supervisor and its workers,
and runs the start order of server/node_plan.py around the Node (server/app.py).

Above both app.py and supervisor.py, which it calls: a Node knows nothing of how it is run,
and the supervisor builds its workers' Nodes from app.py.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import ssl
from collections.abc import Callable
from pathlib import Path

from mailfort import logsetup
from mailfort.config import Config
from mailfort.server import eventloop
from mailfort.server.app import serve
from mailfort.server.malloc import fix_mmap_threshold
from mailfort.server.operations import Operations
from mailfort.server.supervisor import (
    certificate_around_drop,
    hold_signals,
    run_supervisor,
    worker_count,
)

log = logging.getLogger("mailfort")


def raise_file_limit(cfg: Config) -> None:
    """Each session is a descriptor: lift the soft limit to the hard one, warn if short.

    Without this, a server at the soft limit can no longer accept() at all, so clients
    hang instead of getting the 421 that the connection limits promise.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = cfg.limits.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit %d is below limits.max_connections + 256 (%d): "
            "raise it (ulimit -n) or lower limits.max_connections", soft, needed,
        )


def run(cfg: Config, reload_config: Callable[[], Config] | None = None) -> None:
    """``mailfort serve``. ``reload_config`` reads the configuration file again (SIGHUP,
    with worker processes; server/supervisor.py)."""

    handler = logsetup.configure(cfg)  # [log]: text or json, stderr or a file
    fix_mmap_threshold()  # argon2's blocks given back after each login (server/malloc.py)
    supervised = worker_count(cfg) > 1  # [server] workers: a supervisor and its workers
    if supervised:
        # Before Operations starts the ACME challenge thread: a thread inherits the mask,
        # and one that does not hold the supervisor's signals would take their default
        # action (a worker's SIGUSR2 "serving" ended the node).
        hold_signals()
    ops = Operations(cfg, handler)  # refuses root on privileged ports before any bind
    raise_file_limit(cfg)
    if supervised:
        raise SystemExit(run_supervisor(cfg, ops, reload_config))
    # As the supervisor does: root binds and reads the configured certificate, then drops.
    # The data directory is the service user's to change, so everything in it (the
    # directory, the spool's recovery, the self-signed certificate, the counters, the
    # Maildirs) is opened only after the drop (issue 24).
    ops.bind()
    ssl_context = configured_context(cfg)
    # Before the loop and its threads (a fork): the node reads the certificate's record.
    certificate_around_drop(cfg, ops)
    eventloop.run(serve(cfg, ops, ssl_context))


def configured_context(cfg: Config) -> ssl.SSLContext | None:
    """The TLS context of ``tls.cert_file``, read now (as root when started so, before the
    drop: its key may be root's alone), when it lies outside the data directory; None for
    a certificate in the data directory (self-signed, ACME, or put there), which the node
    reads after the drop."""
    if not cfg.tls.cert_file or cfg.tls.acme:
        return None
    data = cfg.data_path.resolve()
    for name in (cfg.tls.cert_file, cfg.tls.key_file):
        if Path(name).resolve().is_relative_to(data):
            return None
    from mailfort.tls import server_context

    return server_context(cfg)
