"""Connection accounting shared by every listener: limits in all and per client IP."""

from __future__ import annotations

import ipaddress
from collections import Counter
from enum import Enum


class Admission(Enum):
    OK = "ok"
    TOO_MANY = "too many connections"
    TOO_MANY_FROM_IP = "too many connections from this address"


class ConnectionLimiter:
    """Counts admitted connections; refusals are answered at greeting, then closed."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> Admission:
        if self.total >= self.max_total:
            return Admission.TOO_MANY
        if self.per_ip[ip] >= self.max_per_ip:
            return Admission.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] += 1
        return Admission.OK

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
