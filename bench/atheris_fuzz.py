"""Coverage-guided fuzzing (atheris/libFuzzer) of mailfort's parsers, bounded in time.

    python bench/atheris_fuzz.py                      # every target, 25 s each
    python bench/atheris_fuzz.py --target smtp --seconds 300
    python bench/atheris_fuzz.py --target smtp --run-one   # (internal) one libFuzzer run

Targets: ``smtp`` (the SMTP engine: bytes in, every event answered, positively or not, from
the same input), ``pop3`` (the POP3 engine likewise), ``imap`` (the IMAP command reader:
the input fed whole and in the fuzzer's chunks gives the same events, memory stays within
the limits, IDLE and AUTHENTICATE lines taken when the events ask), ``imapd`` (the IMAP
engine over that reader: every event answered, positively or not; every output line a
``*``, ``+`` or tagged response), ``managesieve`` (the ManageSieve engine: every event
answered, positively or not; the output a sequence of response lines and ``{N}`` literals;
the input it holds bounded by its limits), ``address`` (RFC 5321
paths and ESMTP parameters), ``msa`` (the From:/Message-ID/Date header checks of
submission), ``config`` (TOML to a validated Config) and ``sieve`` (a Sieve script compiled,
and when it compiles, run on a message: only SieveError may refuse it, a run never raises
and ends in at least one action, an error always in a plain keep). A crash is any exception other
than the parser's own refusal (AddressError, ConfigError, TOML errors), an engine's
``internal_error`` (the engine catches its own bugs and answers 421; the fuzzer must see
them), or a broken invariant (a reply line without CRLF). Seeds are in
bench/fuzz_corpus/<target>/ (kept in the repository); inputs the fuzzer finds go to a
scratch directory, crashes to bench/fuzz_crashes/. Each target runs in its own process
(libFuzzer exits when done); the summary line per target gives executions, executions per
second and coverage (edges ``cov`` and features ``ft``) as libFuzzer counts them. Not part
of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz_corpus"
CRASHES = HERE / "fuzz_crashes"
TARGETS = ("smtp", "pop3", "imap", "imapd", "managesieve", "address", "msa", "config",
           "sieve")


# ------------------------------------------------------------------------- the targets
# Each builds its test function after atheris has instrumented mailfort's modules.


def smtp_target():  # type: ignore[no-untyped-def]
    import atheris

    from mailfort.protocol import smtp
    from mailfort.protocol.replies import Reply

    settings = smtp.EngineSettings(hostname="mx.fuzz.test", tls_available=True,
                                   auth_mechanisms=("PLAIN", "LOGIN"), auth_requires_tls=False,
                                   max_message_size=4096, max_recipients=5)
    answers = [Reply(250, "2.0.0", "OK"), Reply(354, "", "go on"), Reply(550, "5.7.1", "no"),
               Reply(451, "4.3.0", "later"), Reply(421, "4.7.0", "bye"),
               Reply(235, "2.7.0", "Authentication successful")]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        engine = smtp.SMTPEngine(settings, tls_active=fdp.ConsumeBool())
        engine.greet()
        choices = fdp.ConsumeBytes(16) or b"\0"
        k = 0
        while fdp.remaining_bytes() and not engine.closed:
            engine.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)))
            while (ev := engine.next_event()) is not None:
                k += 1
                c = choices[k % len(choices)]
                if isinstance(ev, smtp.StartTLS):
                    engine.tls_started()
                elif engine.waiting and not isinstance(ev, smtp.StartTLS):
                    if isinstance(ev, smtp.DataStart):
                        engine.decide(answers[1] if c % 3 else answers[2])
                    else:
                        engine.decide(answers[c % len(answers)] if c % 4 else answers[0])
            _check_smtp_output(engine.take_output())
            engine.take_hold()
            if engine.internal_error is not None:
                raise engine.internal_error

    return one


def _check_smtp_output(out: bytes) -> None:
    if out and not out.endswith(b"\r\n"):
        raise AssertionError(f"reply without CRLF: {out[-80:]!r}")
    for line in out.split(b"\r\n")[:-1]:
        if not re.fullmatch(rb"[2-5]\d\d[ -].*", line, re.S) or b"\n" in line or b"\r" in line:
            raise AssertionError(f"malformed reply line: {line[:80]!r}")


def pop3_target():  # type: ignore[no-untyped-def]
    import atheris

    from mailfort.protocol import pop3

    settings = pop3.EngineSettings(tls_available=True, allow_plaintext=True)
    listing = [("uid-a", 120), ("uid-b", 4000), ("uid-c", 1)]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        engine = pop3.POP3Engine(settings, tls_active=fdp.ConsumeBool())
        engine.greet()
        choices = fdp.ConsumeBytes(16) or b"\0"
        k = 0
        while fdp.remaining_bytes() and not engine.closed:
            engine.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)))
            while (ev := engine.next_event()) is not None:
                k += 1
                c = choices[k % len(choices)]
                if isinstance(ev, pop3.CheckCredentials):
                    if c % 3:
                        engine.credentials_accepted("alice@example.test")
                    else:
                        engine.credentials_refused()
                elif isinstance(ev, pop3.OpenMailbox):
                    if c % 5:
                        engine.mailbox_opened(listing[: c % 4])
                    else:
                        engine.mailbox_unavailable("[IN-USE] locked")
                elif isinstance(ev, pop3.StartTLS):
                    engine.tls_started()
                elif isinstance(ev, pop3.Retrieve):
                    if c % 4:
                        engine.retrieve_started(listing[ev.index][1])
                        engine.retrieve_done()
                    else:
                        engine.retrieve_failed("[SYS/TEMP] gone")
                elif isinstance(ev, pop3.Quit):
                    engine.update_done(c % 2)
            out = engine.take_output()
            engine.take_hold()
            if out and not out.endswith(b"\r\n"):
                raise AssertionError(f"reply without CRLF: {out[-80:]!r}")
            if engine.internal_error is not None:
                raise engine.internal_error

    return one


def imap_target():  # type: ignore[no-untyped-def]
    import atheris

    from mailfort.protocol import imap_parse as ip

    limits = ip.Limits(max_line=512, max_literal=256, max_append=2048, max_nonsync_literal=128,
                       max_discard=4096, max_depth=6, max_ranges=40, max_search_keys=30)
    bound = limits.max_line + limits.max_append + 64

    def drive(reader: ip.CommandReader, chunks: list[bytes]) -> list[object]:
        """Feed chunk by chunk, draining after each; switch modes as an engine would."""
        out: list[object] = []
        for chunk in chunks:
            reader.feed(chunk)
            while (ev := reader.next_event()) is not None:
                out.append(ev)
                if isinstance(ev, ip.Command) and ev.name == "IDLE":
                    reader.expect_done()
                elif isinstance(ev, ip.Command) and ev.name == "AUTHENTICATE":
                    reader.expect_sasl_response()
                elif isinstance(ev, ip.ParseError) and ev.fatal:
                    return out
            if reader.held > bound + len(chunk):
                raise AssertionError(f"reader holds {reader.held} octets")
        return out

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        cuts = [fdp.ConsumeIntInRange(1, 64) for _ in range(4)]
        stream = fdp.ConsumeBytes(fdp.remaining_bytes())
        chunks, pos, k = [], 0, 0
        while pos < len(stream):
            chunks.append(stream[pos:pos + cuts[k % 4]])
            pos += cuts[k % 4]
            k += 1
        split = drive(ip.CommandReader(limits), chunks)
        whole = drive(ip.CommandReader(limits), [stream])
        if split != whole:
            raise AssertionError(f"chunking changed the events: {split!r} != {whole!r}")

    return one


def imapd_target():  # type: ignore[no-untyped-def]
    import atheris

    from mailfort.protocol import imap
    from mailfort.protocol.imap_parse import Limits

    settings = imap.EngineSettings(
        tls_available=True, max_errors=50, append_limit=2048,
        limits=Limits(max_line=512, max_literal=256, max_nonsync_literal=128, max_discard=4096))

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        engine = imap.IMAPEngine(
            settings if fdp.ConsumeBool() else
            imap.EngineSettings(tls_available=True, allow_plaintext=True),
            tls_active=fdp.ConsumeBool())
        engine.greet()
        choices = fdp.ConsumeBytes(16) or b"\0"
        k = 0
        while fdp.remaining_bytes() and not engine.closed:
            engine.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)))
            while (ev := engine.next_event()) is not None:
                k += 1
                c = choices[k % len(choices)]
                if isinstance(ev, imap.CheckCredentials):
                    if c % 3 == 0:
                        engine.credentials_accepted("alice@example.test")
                    elif c % 3 == 1:
                        engine.credentials_refused()
                    else:
                        engine.credentials_unverifiable()
                elif isinstance(ev, imap.StartTLS):
                    engine.tls_started()
                elif isinstance(ev, imap.Execute):
                    engine.write_untagged(b"* 1 EXISTS\r\n")
                    engine.executed(("OK", "NO", "BAD")[c % 3], "CODE" if c & 4 else None,
                                    "done", (None, True, False)[c % 3])
                elif isinstance(ev, imap.Idle):
                    engine.write_untagged(b"* 2 EXISTS\r\n")
            out = engine.take_output()
            engine.take_hold()
            for line in out.split(b"\r\n")[:-1] if out else ():
                if not (line.startswith((b"* ", b"+ ")) or line.split(b" ")[1:2] in (
                        [b"OK"], [b"NO"], [b"BAD"])):
                    raise AssertionError(f"not a response: {line[:80]!r}")
            if out and not out.endswith(b"\r\n"):
                raise AssertionError(f"reply without CRLF: {out[-80:]!r}")
            if engine.internal_error is not None:
                raise engine.internal_error

    return one


def managesieve_target():  # type: ignore[no-untyped-def]
    import atheris

    from mailfort.protocol import managesieve as ms

    small = ms.EngineSettings(tls_available=True, max_errors=50, max_script_size=512,
                              max_discard=4096, sieve_extensions=("fileinto",))
    bound = 512 + (ms.MAX_ARGS + 1) * ms.MAX_STRING + 600 + 64

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        engine = ms.ManageSieveEngine(
            small if fdp.ConsumeBool() else
            ms.EngineSettings(tls_available=True, allow_plaintext=True),
            tls_active=fdp.ConsumeBool())
        engine.greet()
        choices = fdp.ConsumeBytes(16) or b"\0"
        k = 0
        out = b""
        while fdp.remaining_bytes() and not engine.closed:
            engine.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)))
            while (ev := engine.next_event()) is not None:
                k += 1
                c = choices[k % len(choices)]
                if isinstance(ev, ms.CheckCredentials):
                    if c % 3 == 0:
                        engine.credentials_accepted("alice@example.test")
                    elif c % 3 == 1:
                        engine.credentials_refused()
                    else:
                        engine.credentials_unverifiable()
                elif isinstance(ev, ms.StartTLS):
                    engine.tls_started()
                elif isinstance(ev, ms.Execute):
                    engine.executed(bool(c & 1), "NONEXISTENT" if c & 2 else "", "done",
                                    listing=[("a", True)] if c & 4 else None,
                                    script=b"keep;\r\n" if c & 8 else None)
            out += engine.take_output()
            engine.take_hold()
            if engine.held > bound:
                raise AssertionError(f"holds {engine.held} octets")
            if engine.internal_error is not None:
                raise engine.internal_error
        _check_managesieve_output(out)

    return one


_MS_LINE = re.compile(rb'(OK|NO|BYE)( \([^()\r\n]*( "[^"\r\n]*")?\))?( ".*")?|""|'
                      rb'"[^"\r\n]*(\\.[^"\r\n]*)*"( ".*"| ACTIVE)?')


def _check_managesieve_output(out: bytes) -> None:
    i = 0
    while i < len(out):
        end = out.find(b"\r\n", i)
        if end < 0:
            raise AssertionError(f"reply without CRLF: {out[i:i + 80]!r}")
        line, i = out[i:end], end + 2
        lit = re.fullmatch(rb"\{(\d+)\}", line)
        if lit:
            i += int(lit.group(1))
            if out[i:i + 2] != b"\r\n":
                raise AssertionError("literal not followed by CRLF")
            i += 2
        elif not _MS_LINE.fullmatch(line):
            raise AssertionError(f"not a response: {line[:80]!r}")


def address_target():  # type: ignore[no-untyped-def]
    import atheris

    from mailfort.protocol.address import AddressError, parse_esmtp_params, parse_mail_argument

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        prefix = "FROM:" if fdp.ConsumeBool() else "TO:"
        null_ok, utf8_ok = fdp.ConsumeBool(), fdp.ConsumeBool()
        text = fdp.ConsumeUnicodeNoSurrogates(1000)
        try:
            mailbox, _ = parse_mail_argument(text, prefix=prefix, null_allowed=null_ok,
                                             smtputf8_allowed=utf8_ok)
        except AddressError:
            pass
        else:
            if mailbox is not None:  # what we parsed, written back, parses to the same
                again, _ = parse_mail_argument(f"{prefix}<{mailbox}>", prefix=prefix,
                                               null_allowed=False, smtputf8_allowed=utf8_ok)
                if again != mailbox:
                    raise AssertionError(f"{text!r}: {mailbox!r} reparsed as {again!r}")
        with contextlib.suppress(AddressError):
            parse_esmtp_params(text, smtputf8_allowed=utf8_ok)

    return one


class _FuzzDirectory:
    """The directory the header checks consult: one local user with one alias."""

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() == "example.test"

    def resolve(self, address: str) -> None:
        return None

    def password_hash(self, user: str) -> None:
        return None

    def addresses_of(self, user: str) -> frozenset[str]:
        return frozenset({"alice@example.test", "team@example.test"})


def msa_target():  # type: ignore[no-untyped-def]
    from mailfort.config import Config, ServerConfig
    from mailfort.policy.counters import MemoryCounters
    from mailfort.policy.dmarc import from_domains
    from mailfort.policy.msa import MSAPolicy, append_header_lines

    scratch = Path(tempfile.mkdtemp(prefix="mailfort-fuzz-msa-"))
    cfg = Config(server=ServerConfig(data_dir=str(scratch)))
    policy = MSAPolicy(cfg, _FuzzDirectory(), MemoryCounters())  # type: ignore[arg-type]

    def one(data: bytes) -> None:
        refusal, block = policy.check_headers("alice@example.test", data)
        if refusal is None:
            if not block.startswith(data):
                raise AssertionError("the client's header block was changed")
            if block != data and b"\r\n" not in block[len(data):]:
                raise AssertionError("added header lines without CRLF")
        from_domains(data)
        append_header_lines(data, ["X-Fuzz: 1"])

    return one


def config_target():  # type: ignore[no-untyped-def]
    import tomllib

    from mailfort.config import ConfigError, from_dict

    def one(data: bytes) -> None:
        try:
            parsed = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            return
        with contextlib.suppress(ConfigError):
            from_dict(parsed)

    return one


def sieve_target():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from mailfort.protocol.sieve import (
        Keep,
        SieveEnvironment,
        SieveError,
        SieveLimits,
        SieveMessage,
        compile_script,
    )

    limits = SieveLimits(max_cpu_ms=1000)
    header = (b"From: A <a+tag@example.com>\r\nTo: b@example.net, c@example.org\r\n"
              b"Subject: =?utf-8?q?caf=C3=A9?= hello\r\nDate: Mon, 7 Dec 2026 10:00:00 +0100\r\n"
              b"X-Spam-Score: 7\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n")
    body = b"--b\r\nContent-Type: text/plain\r\n\r\nhello noon\r\n--b--\r\n"
    env = SieveEnvironment(now=datetime(2026, 12, 7, tzinfo=UTC), hostname="mx.fuzz.test",
                           mailbox_exists=lambda name: name == "INBOX")
    scripts = {"inc": b'require ["fileinto"]; fileinto "Inc";'}

    def one(data: bytes) -> None:
        try:
            script = compile_script(data, limits=limits,
                                    include=lambda name, global_: scripts.get(name))
        except SieveError as err:
            if err.line < 1 or err.column < 1:
                raise AssertionError(f"bad position {err.line}:{err.column}") from None
            return
        msg = SieveMessage.from_bytes(header, lambda: body, size=len(header) + len(body),
                                      envelope_from="a+tag@example.com",
                                      envelope_to="b@example.net")
        result = script.run(msg, env)
        if not result.actions:
            raise AssertionError("a run without any action")
        if result.error is not None:
            if result.error.startswith("internal error"):
                raise AssertionError(result.error)
            if result.actions != [Keep()]:
                raise AssertionError("an error without a plain keep")

    return one


BUILDERS = {"smtp": smtp_target, "pop3": pop3_target, "imap": imap_target,
            "imapd": imapd_target, "managesieve": managesieve_target,
            "address": address_target,
            "msa": msa_target, "config": config_target, "sieve": sieve_target}


# ------------------------------------------------------------------------- running


def run_one(target: str, seconds: int, extra: list[str]) -> None:
    """In this process: instrument mailfort, run libFuzzer until ``seconds`` pass."""
    import atheris

    with atheris.instrument_imports(include=["mailfort"]):
        import mailfort.config
        import mailfort.policy.dmarc
        import mailfort.policy.msa
        import mailfort.policy.senders
        import mailfort.protocol.address
        import mailfort.protocol.imap
        import mailfort.protocol.imap_parse
        import mailfort.protocol.managesieve
        import mailfort.protocol.pop3
        import mailfort.protocol.sieve
        import mailfort.protocol.smtp  # noqa: F401
    one = BUILDERS[target]()
    CRASHES.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"mailfort-fuzz-{target}-"))
    argv = [sys.argv[0], f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
            f"-artifact_prefix={CRASHES}/{target}-", "-print_final_stats=1", *extra,
            str(work), str(CORPUS / target)]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def summarize(target: str, log: str) -> str:
    """One table row from libFuzzer's output."""
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", log)
    covs = re.findall(r"cov: (\d+) ft: (\d+)", log)
    crashed = "crash-" in log or "==ERROR" in log or "Uncaught Python exception" in log
    cov, ft = covs[-1] if covs else ("?", "?")
    seeds = len(list((CORPUS / target).iterdir()))
    return (f"| {target} | {seeds} | {runs.group(1) if runs else '?'} | "
            f"{rate.group(1) if rate else '?'} | {cov} | {ft} | "
            f"{'CRASH (see bench/fuzz_crashes)' if crashed else 'none'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=TARGETS, action="append")
    ap.add_argument("--seconds", type=int, default=25)
    ap.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    targets = args.target or list(TARGETS)
    if args.run_one:
        run_one(targets[0], args.seconds, extra)
        return 0
    rows = []
    for target in targets:
        proc = subprocess.run([sys.executable, __file__, "--run-one", "--target", target,
                               "--seconds", str(args.seconds), *extra],
                              capture_output=True, text=True, timeout=args.seconds + 120)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = "\n".join(log.splitlines()[-25:])
            print(f"# {target}: exit {proc.returncode}\n{tail}", flush=True)
        rows.append(summarize(target, log))
        print(rows[-1], flush=True)
    print("\n| target | seeds | executions | exec/s | cov (edges) | ft | crashes |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
