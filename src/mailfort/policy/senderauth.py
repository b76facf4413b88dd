"""Sender authentication of inbound MX mail: SPF at MAIL FROM, DKIM and DMARC at the end.

Composes spf, dkim, dmarc and authresults into the two decisions the MX session asks
for, and says what to add to the message. No sockets and no event loop: every method is
synchronous (DNS and CPU) and the session runs it in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mailfort.config import Config
from mailfort.policy import authresults, dmarc, spf
from mailfort.policy import dkim as dkim_mod
from mailfort.policy.dnslookup import Lookup
from mailfort.protocol.replies import Reply

log = logging.getLogger("mailfort.senderauth")
# RFC 5322 §3.6 and RFC 7489 §6.6.1: exactly one From: field with exactly one address.
FROM_NOT_ONE = Reply(550, "5.7.1",
                     "Message refused: the From: header must be one field with one address")
FROM_MISSING = Reply(550, "5.7.1", "Message refused: it has no From: header field; "
                     "exactly one, with one address, is required")
_THREADS = 16  # checks mostly wait for DNS; each holds at most dkim_max_bytes of a message
# (a larger one is verified as it streams: policy/dkim.py)


@dataclass
class Verdict:
    """What to do with a received message."""

    refusal: Reply | None = None
    fields: bytes = b""  # header fields to add above the client's (CRLF-terminated)
    junk: bool = False  # file into the Junk folder
    summary: str = ""  # for the log line
    dmarc: dmarc.DMARCResult | None = None
    dkim: list[dkim_mod.DKIMResult] = field(default_factory=list)


def header_block(message: bytes) -> bytes:
    """The header section of ``message``, without the blank line that ends it."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


class SenderAuth:
    def __init__(self, cfg: Config, lookup: Lookup | None = None,
                 rand: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.opts = cfg.sender_auth
        self.lookup = lookup or Lookup(cfg.dns)
        self.rand = rand
        self.spf_results = spf.ResultCache()  # a sender's next message: no evaluation
        # Its own threads: a slow DNS answer (up to spf_time_budget) must not hold up the
        # threads that other work (password hashing, mailbox I/O) takes from the default pool.
        self.executor = ThreadPoolExecutor(max_workers=_THREADS,
                                           thread_name_prefix="sender-auth")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def check_mail(self, ip: str, helo: str, sender: str) -> tuple[list[spf.SPFResult],
                                                                    Reply | None]:
        """SPF of HELO and MAIL FROM; a refusal only for a fail with ``spf_fail = reject``."""
        budget = self.opts.spf_time_budget
        cache = self.spf_results
        results = [spf.check_helo(self.lookup, ip, helo, budget, cache)]
        results.append(spf.check_mailfrom(self.lookup, ip, sender, helo, budget, cache))
        if self.opts.spf_fail == "reject":
            for r in results:
                if r.result == "fail":
                    return results, Reply(
                        550, "5.7.23",
                        f"SPF of {r.domain} does not permit [{ip}] to send its mail",
                    )
        return results, None

    def check_message(self, message: bytes | None, spf_results: list[spf.SPFResult],
                      sender: str, headers: bytes | None = None,
                      body: Iterable[bytes] = ()) -> Verdict:
        """DKIM and DMARC of the client's message, and the Authentication-Results field
        that reports them with the SPF results. ``message`` is ``None`` when it is too
        large to hold in memory: then ``headers`` is its header section and ``body`` its
        body in pieces, verified as they stream (a large message is judged as a small
        one: leaving it unverified let a padded forgery past DMARC)."""
        if headers is None:
            headers = header_block(message) if message is not None else b""
        author = dmarc.author_domain(headers)
        if author is None:
            # RFC 7489 §6.6.1: no From:, two From: fields, a group or several addresses:
            # DMARC cannot judge the message (an author would go unchecked, or there is
            # none to check, and a reader shows whatever it likes), so it is refused.
            if not dmarc.has_from(headers):
                return Verdict(refusal=FROM_MISSING, summary="from=none")
            return Verdict(refusal=FROM_NOT_ONE, summary="from=not-exactly-one-address")
        opts, timeout = self.opts, self.cfg.dns.timeout
        try:
            if message is not None:
                dkim_results = dkim_mod.verify(message, self.lookup, timeout)
            else:
                dkim_results = dkim_mod.verify_streamed(headers, body, self.lookup, timeout)
        except Exception as exc:  # a malformed message must not cost the session
            dkim_results = [dkim_mod.DKIMResult("permerror", "", "", "", f"{exc}")]
        mailfrom = next((r for r in spf_results if r.identity == "mailfrom"), None)
        result = dmarc.evaluate(self.lookup, [author] if author else None, mailfrom,
                                dkim_results, **({"rand": self.rand} if self.rand else {}))
        verdict = Verdict(dmarc=result, dkim=dkim_results)
        fields = authresults.format_field(
            self.cfg.server.hostname, spf_results, dkim_results, result, sender)
        if opts.dmarc_enforce and result.result == "fail":
            if result.disposition == "reject":
                verdict.refusal = Reply(
                    550, "5.7.1",
                    f"Message rejected by the DMARC policy of {result.domain}",
                )
            elif result.disposition == "quarantine":
                fields += (f"{opts.quarantine_header}: dmarc=fail policy=quarantine "
                           f"header.from={result.domain}\r\n").encode()
                verdict.junk = opts.quarantine == "junk"
        elif opts.dmarc_enforce and result.result == "temperror" and result.policy != "none":
            # An aligned SPF or DKIM check could not be made (a policy lookup that failed
            # leaves policy "none"): the policy would refuse a failure, so ask for a retry.
            verdict.refusal = Reply(
                451, "4.7.5",
                f"DMARC check of {result.domain} failed temporarily, try again later")
        verdict.fields = fields
        spf_text = " ".join(f"spf.{r.identity}={r.result}" for r in spf_results)
        dkim_text = ",".join(f"{d.result}:{d.domain}" for d in dkim_results) or "none"
        verdict.summary = f"{spf_text} dkim={dkim_text} dmarc={result.result}" \
            f"(dis={result.disposition}) from_domain={result.domain}"
        return verdict
