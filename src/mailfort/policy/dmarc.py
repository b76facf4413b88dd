"""DMARC (RFC 7489): does an aligned SPF or DKIM pass vouch for the From: domain?

The organisational domain (§3.2) comes from the Public Suffix List of the maintained
``publicsuffixlist`` package (its list ships with it and is updated with each release).
No I/O besides the DNS lookups of the policy record; synchronous, run in a thread.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from mailfort.policy import headerfields
from mailfort.policy.dkim import DKIMResult
from mailfort.policy.dnslookup import DNSTempError, Lookup
from mailfort.policy.spf import SPFResult

_POLICIES = ("none", "quarantine", "reject")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if shorter).
    Remembered: a message asks it up to three times, and the list never changes while
    the process runs (it ships with the package)."""
    d = domain.lower().rstrip(".")
    return _psl().privatesuffix(d) or d


def aligned(a: str, b: str, mode: str) -> bool:
    """Strict: the same name; relaxed: the same organisational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True)
class Record:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@lru_cache(maxsize=1024)
def parse_record(text: str) -> Record | None:
    """A DMARC record, or None when it is not one (§6.3, §6.6.3). Remembered per text
    (a Record is immutable): a sender's record is read again for every message."""
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        k, sep, v = part.partition("=")
        k, v = k.strip().lower(), v.strip()
        if i == 0:
            if k != "v" or v != "DMARC1":
                return None
            continue
        if sep and k:
            tags.setdefault(k, v)
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags:
            return None
        p = "none"  # §6.6.3: an invalid p with a rua is read as p=none
    sp = tags.get("sp", p).lower()
    sp = sp if sp in _POLICIES else p
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if re.fullmatch(r"\d{1,3}", pct_text) else 100
    return Record(p, sp, adkim if adkim in "rs" else "r", aspf if aspf in "rs" else "r",
                  min(pct, 100))


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    domain: str  # header.from
    policy: str = "none"  # the published policy that applies (p or sp)
    disposition: str = "none"  # what to do: none, quarantine, reject
    reason: str = ""


def _find_record(lookup: Lookup, domain: str) -> tuple[Record | None, bool]:
    """(record, found at the organisational domain); raises DNSTempError."""
    org = organizational_domain(domain)
    for name, at_org in ((domain, False), (org, True)):
        if at_org and org == domain:
            break
        texts = [t for t in lookup.txt(f"_dmarc.{name}") if t.lower().startswith("v=dmarc1")]
        records = [r for r in map(parse_record, texts) if r is not None]
        if len(records) == 1:
            return records[0], at_org
        if len(records) > 1:
            return None, at_org  # §6.6.3: several records mean no DMARC at all
    return None, False


def from_domains(header_block: bytes) -> list[str] | None:
    """The domains of the From: field's mailboxes; None when there is not exactly one
    From: field (RFC 5322 §3.6) or it cannot be read. Fields are read as every reader may
    read them (policy/headerfields.py): ``From :`` is a From: field too."""
    found = headerfields.values(header_block, "from")
    if len(found) != 1:
        return None
    parsed = headerfields.address_list(found[0])
    if parsed is None or not parsed.mailboxes:
        return None
    domains: list[str] = []
    for addr in parsed.mailboxes:
        dom = headerfields.domain_of(addr).rstrip(".")
        if dom not in domains:
            domains.append(dom)
    return domains


def has_from(header_block: bytes) -> bool:
    """Whether the header section has a From: field at all."""
    return bool(headerfields.values(header_block, "from"))


def author_domain(header_block: bytes) -> str | None:
    """The domain of the message's author: the one address of the one From: field. None
    for anything else (no From:, two, a group, several addresses), which DMARC cannot
    judge and RFC 7489 §6.6.1 says to reject: one of those addresses would go unchecked."""
    found = headerfields.values(header_block, "from")
    if len(found) != 1:
        return None
    parsed = headerfields.address_list(found[0])
    single = parsed.single if parsed is not None else None
    return headerfields.domain_of(single).rstrip(".") if single else None


def evaluate(
    lookup: Lookup,
    header_from: Sequence[str] | None,
    spf: SPFResult | None,
    dkim: Sequence[DKIMResult],
    rand: Callable[[], float] = random.random,
) -> DMARCResult:
    """The result for the message; with several author domains, the strictest one."""
    if not header_from:
        return DMARCResult("permerror", "", reason="no single From: field with an address")
    results = [_evaluate_one(lookup, d, spf, dkim, rand) for d in header_from]
    order = {"reject": 2, "quarantine": 1, "none": 0}
    return max(results, key=lambda r: (order[r.disposition], r.result == "fail"))


def _evaluate_one(
    lookup: Lookup, domain: str, spf: SPFResult | None, dkim: Sequence[DKIMResult],
    rand: Callable[[], float],
) -> DMARCResult:
    try:
        record, at_org = _find_record(lookup, domain)
    except DNSTempError as exc:
        return DMARCResult("temperror", domain, reason=f"policy lookup failed: {exc}")
    if record is None:
        return DMARCResult("none", domain, reason="no policy published")
    policy = record.sp if at_org else record.p
    # RFC 7489 §4.2: only identifiers aligned with the From: domain count, for a pass and
    # for a temporary error alike; an unaligned one's outcome says nothing about the author.
    dkim_aligned = [r for r in dkim if aligned(r.domain, domain, record.adkim)]
    spf_aligned = spf is not None and aligned(spf.domain, domain, record.aspf)
    if any(r.result == "pass" for r in dkim_aligned):
        return DMARCResult("pass", domain, policy, reason="aligned DKIM pass")
    if spf_aligned and spf is not None and spf.result == "pass":
        return DMARCResult("pass", domain, policy, reason="aligned SPF pass")
    # An aligned check that could not be made may yet pass: not a failure (the caller
    # has the sender retry when the policy would refuse or quarantine).
    if any(r.result == "temperror" for r in dkim_aligned) or (
            spf_aligned and spf is not None and spf.result == "temperror"):
        return DMARCResult("temperror", domain, policy,
                           reason="aligned SPF or DKIM temporary error")
    disposition = policy
    if record.pct < 100 and rand() * 100 >= record.pct:
        disposition = _WEAKER[policy]  # §6.6.4: outside the sample, one step weaker
    return DMARCResult("fail", domain, policy, disposition, "no aligned SPF or DKIM pass")
