"""A delivery worker over the test DNS server, for the outbound TLS tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mailfort.config import Config
from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker

MSG = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
       b"Subject: hello\r\nMessage-ID: <tls1@example.test>\r\n\r\nHello Bob.\r\n")


async def _no_bounce(user: str, message: bytes, key: str = "") -> None:
    """No test here expects a bounce; one would show up as a failed recipient instead."""


def make_worker(cfg: Config, mx_port: int = 25) -> DeliveryWorker:
    return DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, _no_bounce, mx_port=mx_port)


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
