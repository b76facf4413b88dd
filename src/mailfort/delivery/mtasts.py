"""MTA-STS (RFC 8461): a destination's published demand for verified TLS to listed MXs.

Discovery: the ``_mta-sts.DOMAIN`` TXT record (``v=STSv1; id=...``) through the configured
resolver; then the policy from ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``, fetched
with certificate validation (a failed check is no policy), no redirects followed, bounded
in size and time. Policies are cached (memory and ``DATA_DIR/mta-sts/``) for ``max_age``;
a changed TXT ``id`` refetches, and a cached policy outlives a missing TXT record or a
failed fetch until it expires (§5.1), so an attacker who blocks DNS or HTTPS for a while
does not downgrade a domain we already know.

``publish`` gives the TXT record and policy file for one of our own domains.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import ssl
import time
from dataclasses import asdict, dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailfort.config import Config
from mailfort.delivery.outward import NotOutward, PinnedHTTPS, outward_address

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3 suggests 64 KiB
MAX_AGE_LIMIT = 31557600  # one year (§3.2)


@dataclass(frozen=True)
class STSPolicy:
    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    fetched: float = 0.0
    text: tuple[str, ...] = ()  # the policy lines as served (TLS-RPT policy-string)

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age


class PolicyError(Exception):
    """No valid policy could be had (RFC 8460 result-type in ``result``)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def parse_txt(records: list[str]) -> str | None:
    """The ``id`` of the one valid ``v=STSv1`` record, else None (§3.1)."""
    found = [r for r in records if r.replace(" ", "").startswith("v=STSv1;")
             or r.strip() == "v=STSv1"]
    if len(found) != 1:
        return None
    for part in found[0].split(";"):
        k, _, v = part.strip().partition("=")
        if k == "id" and v and v.isalnum() and len(v) <= 32:
            return v
    return None


def parse_policy(text: str, sts_id: str = "", now: float = 0.0) -> STSPolicy:
    """The policy file (§3.2); raises PolicyError for anything invalid."""
    fields: dict[str, list[str]] = {}
    lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()]
    for ln in lines:
        k, sep, v = ln.partition(":")
        if not sep:
            raise PolicyError("sts-policy-invalid", f"bad policy line {ln[:80]!r}")
        fields.setdefault(k.strip(), []).append(v.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("sts-policy-invalid", "policy version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError("sts-policy-invalid", f"bad mode {mode!r}")
    try:
        max_age = int((fields.get("max_age") or [""])[0])
    except ValueError:
        raise PolicyError("sts-policy-invalid", "max_age missing or not a number") from None
    if not 0 <= max_age <= MAX_AGE_LIMIT:
        raise PolicyError("sts-policy-invalid", "max_age out of range")
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("sts-policy-invalid", "no mx in an enforce/testing policy")
    return STSPolicy(mode, mx, max_age, sts_id, now, tuple(lines))


def _fetch_sync(host: str, address: str, port: int, ctx: ssl.SSLContext,
                timeout: float) -> str:
    conn = PinnedHTTPS(host, address, port, ctx, timeout)
    try:
        try:
            conn.request("GET", "/.well-known/mta-sts.txt", headers={"Host": host})
            resp = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            raise PolicyError("sts-webpki-invalid", f"{host}: {exc.verify_message}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise PolicyError("sts-policy-fetch-error", f"{host}: {exc}") from None
        if resp.status != 200:  # redirects are not followed (§3.3)
            raise PolicyError("sts-policy-fetch-error", f"{host}: HTTP {resp.status}")
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise PolicyError("sts-policy-invalid", f"{host}: media type {ctype!r}")
        body = resp.read(MAX_POLICY_SIZE + 1)
        if len(body) > MAX_POLICY_SIZE:
            raise PolicyError("sts-policy-invalid", f"{host}: policy larger than 64 KiB")
        return body.decode("utf-8", "replace")
    finally:
        conn.close()


class MTASTS:
    """Policy lookup with the cache of §5.1, for the delivery worker."""

    def __init__(self, cfg: Config, resolver: dns.asyncresolver.Resolver,
                 clock: object = time.time) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.clock = clock
        self.dir = cfg.data_path / "mta-sts"
        self._cache: dict[str, STSPolicy] = {}
        # Made at the first fetch: a context with the CA store holds about 1 MB, and most
        # processes of a node never fetch a policy (only the one that delivers does).
        self._ctx: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            d = self.cfg.delivery
            ctx = ssl.create_default_context(cafile=(d.mta_sts_ca_file or d.ca_file) or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ctx = ctx
        return self._ctx

    def _now(self) -> float:
        return float(self.clock())  # type: ignore[operator]

    def _cached(self, domain: str) -> STSPolicy | None:
        p = self._cache.get(domain)
        if p is None:
            path = self.dir / f"{domain}.json"
            try:
                raw = json.loads(path.read_text())
                p = STSPolicy(raw["mode"], tuple(raw["mx"]), int(raw["max_age"]), raw["id"],
                              float(raw["fetched"]), tuple(raw["text"]))
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._cache[domain] = p
        return None if p.expired(self._now()) else p

    def _store(self, domain: str, p: STSPolicy) -> None:
        self._cache[domain] = p
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{domain}.tmp"
            tmp.write_text(json.dumps(asdict(p)))
            tmp.replace(self.dir / f"{domain}.json")
        except OSError:
            pass  # the memory cache still holds it

    async def _txt_id(self, domain: str) -> str | None:
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
        except dns.exception.DNSException:
            return None
        return parse_txt([b"".join(r.strings).decode("utf-8", "replace") for r in answer])

    async def _address(self, host: str) -> str:
        fixed = self.cfg.delivery.mta_sts_addresses.get(host)
        if fixed:
            return fixed
        try:  # the fetch must not reach internal services either
            return await outward_address(
                self.resolver, host, allow_private=self.cfg.delivery.allow_private_destinations)
        except NotOutward as exc:
            raise PolicyError("sts-policy-fetch-error", str(exc)) from None

    async def fetch(self, domain: str, sts_id: str) -> STSPolicy:
        host = f"mta-sts.{domain}"
        address = await self._address(host)
        text = await asyncio.to_thread(_fetch_sync, host, address,
                                       self.cfg.delivery.mta_sts_port, self._context(),
                                       self.cfg.dns.timeout + 5)
        return parse_policy(text, sts_id, self._now())

    async def get(self, domain: str) -> tuple[STSPolicy | None, PolicyError | None]:
        """The policy in force for ``domain`` (or None) and the failure to report, if any."""
        domain = domain.lower().rstrip(".")
        cached = self._cached(domain)
        sts_id = await self._txt_id(domain)
        if sts_id is None:
            return cached, None  # no (valid) record: keep a known policy until it expires
        if cached is not None and cached.id == sts_id:
            return cached, None
        try:
            policy = await self.fetch(domain, sts_id)
        except PolicyError as exc:
            return cached, exc
        self._store(domain, policy)
        return policy, None


def publish(domain: str, mx_hosts: list[str], *, mode: str = "enforce",
            max_age: int = 604800) -> tuple[str, str]:
    """(TXT record line, policy file) for one of our own domains; the id is derived from
    the policy text, so it changes exactly when the policy does."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {h}" for h in mx_hosts),
             f"max_age: {max_age}"]
    policy = "\r\n".join(lines) + "\r\n"
    sts_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
    txt = f'_mta-sts.{domain}. IN TXT "v=STSv1; id={sts_id}"'
    return txt, policy
