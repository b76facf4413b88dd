"""English: what each attack does, what stops it, and where in mailfort."""

ATTACKS: dict[str, dict[str, str]] = {
    "one-door": {
        "title": "One door for submission and relay",
        "summary": "a client with no account submits mail on port 25 as a local user",
        "attack": "A stranger connects to port 25, the only door of the legacy server, and "
                  "sends a message as alice@example.test to a partner at remote.example, "
                  "without any account. On the hardened server it tries port 25 and then the "
                  "submission port.",
        "counter": "mailfort has three doors: the MX on 25 receives mail for local domains "
                   "only and offers no AUTH; submission on 587 (STARTTLS, then AUTH) and 465 "
                   "(implicit TLS, AUTH) accept MAIL only after AUTH (530 5.7.0), and only "
                   "there may mail leave for foreign domains. Where: ServiceOptions in "
                   "server/smtp.py and the listeners in server/app.py; the engine's "
                   "auth_required in protocol/smtp.py.",
    },
    "open-relay": {
        "title": "Open relay (third-party relay)",
        "summary": "a stranger's spam for a foreign domain arrives in the victim's sink",
        "attack": "A spam engine with no link to the server sends from spam-engine.example "
                  "to victim@remote.example through it.",
        "counter": "The recipient is judged at RCPT time, after the address is parsed as RFC "
                   "5321 defines it: a foreign domain is refused with 554 5.7.1 unless the "
                   "client has authenticated (or is a listed trusted network), and %, !, a "
                   "quoted @, source routes and address literals are never routes. A config "
                   "that would open the relay (0.0.0.0/0) is refused. Where: "
                   "policy/relay.py (decide_recipient), protocol/address.py, config.py.",
    },
    "spoofing": {
        "title": "Sender spoofing",
        "summary": "a forged MAIL FROM/From: of a local user is delivered as if genuine",
        "attack": "mallory, who has an account, sends bob an urgent payment order as "
                  "ceo@example.test (MAIL FROM and From:); then a stranger sends the same "
                  "forgery from outside, straight to the MX.",
        "counter": "An authenticated user may send only as their own address or an alias "
                   "that leads to them, in MAIL FROM and in the From: header (553 5.7.1). "
                   "Where: policy/senders.py and policy/msa.py, applied by the submission "
                   "services. From outside, the MX checks SPF and DMARC: example.test "
                   "publishes 'v=spf1 -all' and 'p=reject', the forged mail passes neither, "
                   "and it is refused with 550 5.7.1 at the end of data. Where: "
                   "policy/spf.py, policy/dmarc.py, server/senderauth.py.",
    },
    "backscatter": {
        "title": "Backscatter (NDR spam)",
        "summary": "spam to an unknown user with a forged sender: the bounce carries it to "
                   "the forged address",
        "attack": "A spam engine sends its spam to a user that does not exist, with the "
                  "victim's address victim@innocent.example as sender.",
        "counter": "Unknown local users are refused at RCPT with 550 5.1.1, so nothing is "
                   "accepted that would have to bounce; the queue bounces only mail that an "
                   "authenticated local user submitted, only to that user, never to a null "
                   "sender. Where: policy/relay.py (decide_recipient) and may_bounce in "
                   "queue/worker.py.",
    },
    "vacation-backscatter": {
        "title": "Backscatter from a vacation responder",
        "summary": "mail with a forged sender to a user on vacation: the auto-reply goes to "
                   "the forged address",
        "attack": "carol is on vacation (a Sieve vacation script). A spam engine sends her a "
                  "message with the victim's address victim@innocent.example as sender; "
                  "innocent.example publishes 'v=spf1 -all', so the sender is plainly forged.",
        "counter": "A vacation reply goes only to an authenticated sender: a local user who "
                   "logged in on submission, or, from outside, SPF pass or DKIM pass of the "
                   "envelope sender's domain; never to a null, MAILER-DAEMON, owner- or "
                   "-request sender, a list or automatic message, or a message not addressed "
                   "to the user; once per sender per period. Where: policy/vacation.py, "
                   "server/sieve_delivery.py.",
    },
    "sniff": {
        "title": "Plaintext: passwords and mail on the wire",
        "summary": "alice's password (AUTH PLAIN, POP3 PASS, IMAP LOGIN) and her message "
                   "read from the wire recording",
        "attack": "alice sends a confidential message and reads her mailbox over POP3 and "
                  "IMAP, as her mail program always does: it logs in the way the server's "
                  "capabilities allow. The recording proxy shows what anyone on the path "
                  "(a shared network, a tap) reads.",
        "counter": "AUTH is offered only inside TLS (538 5.7.11 before it), POP3 "
                   "USER/PASS is refused before STLS, and IMAP says LOGINDISABLED with no "
                   "AUTH= before STARTTLS and answers LOGIN or AUTHENTICATE with NO "
                   "[PRIVACYREQUIRED], so a client never sends its password in the clear; "
                   "STARTTLS and STLS on 25, 587, 110 and 143, implicit TLS on 465, 995 and "
                   "993, TLS 1.2 or newer only, and whatever was pipelined before the "
                   "handshake is thrown away. Where: protocol/smtp.py (auth_requires_tls), "
                   "protocol/pop3.py, protocol/imap.py (allow_plaintext), tls.py.",
    },
    "vrfy": {
        "title": "Account disclosure through VRFY/EXPN",
        "summary": "the user list and an alias's real destination recovered through "
                   "VRFY/EXPN",
        "attack": "A harvester asks VRFY for twelve common names and EXPN for two aliases.",
        "counter": "VRFY answers 252 for every argument and EXPN 502, so the replies tell "
                   "nobody apart; the banner names no software; failed AUTH looks the same "
                   "for real and unknown users. (RCPT must still refuse unknown users: that "
                   "is what stops backscatter, and it is rate-limited by the error limit.) "
                   "Where: _cmd_vrfy and _cmd_expn in protocol/smtp.py.",
    },
    "smuggling": {
        "title": "SMTP smuggling",
        "summary": "a second message with a forged sender smuggled through <LF>.<LF>",
        "attack": "Inside one message, the attacker ends a line with a bare LF, a dot and a "
                  "bare LF, followed by a complete second transaction from ceo@example.test.",
        "counter": "Only <CRLF>.<CRLF> ends DATA, and a message with a bare CR or LF is "
                   "refused after its end (550 5.6.0), so no two servers can disagree about "
                   "where a message ends. Where: _step_data in protocol/smtp.py and "
                   "protocol/body.py.",
    },
    "overflow": {
        "title": "Buffer overflow and resource exhaustion",
        "summary": "a 20,000-octet command line and 2,000 RCPTs: held on legacy, refused on "
                   "hardened",
        "attack": "The attacker sends a command line of 20,000 octets (old MTAs copied lines "
                  "into fixed buffers: BOF), then 2,000 recipients in one transaction.",
        "counter": "Hard limits on everything read from the network, each with a clear reply: "
                   "command line 512 octets (500 5.5.2), text line 1000, SIZE, 100 recipients "
                   "(452 4.5.3), 10 errors (421 4.7.0), idle and session time, connections; "
                   "the body is streamed to disk; the parsers are fuzzed. Where: "
                   "protocol/lines.py, protocol/errors.py, protocol/body.py, config.py "
                   "[limits].",
    },
    "guessing": {
        "title": "Password guessing",
        "summary": "passwords tried over SMTP AUTH and POP3: unlimited on legacy, delayed "
                   "then blocked on hardened",
        "attack": "From its own address, the attacker tries nine common passwords for "
                  "bob@example.test: five over SMTP AUTH, then the rest over POP3.",
        "counter": "One authenticator for SMTP AUTH and POP3 counts failures per client and "
                   "per account: growing delays, then a block of the client (even a correct "
                   "password is then refused); an account is slowed, never locked, so its "
                   "owner cannot be shut out. (The lab scales the delays down so that the "
                   "demonstration ends in seconds.) Where: policy/authn.py, "
                   "policy/counters.py, config.py [auth].",
    },
}

NOTES: dict[str, str] = {
    "auth.offered-on-25": "port 25 offers AUTH in the clear: one door for users and servers",
    "auth.not-on-25": "port 25 offers no AUTH: it is the door for other servers only",
    "sink.arrived": "victim sink: {n} message(s) arrived, sent in alice's name by a stranger",
    "sink.relayed": "victim sink: the spam arrived, relayed by {host} ({received} Received "
                    "header naming it)",
    "sink.empty": "victim sink: nothing arrived",
    "mailbox.forged": "{user}'s mailbox: the forged order from ceo@example.test is stored "
                      "as if genuine",
    "mailbox.clean": "{user}'s mailbox: no forged message",
    "forged.bounce": "forged sender's mailbox: a bounce arrived for {to} (spam inside: {spam})",
    "forged.nothing": "forged sender's mailbox: nothing arrived for {to}",
    "forged.autoreply": "forged sender's mailbox: an auto-reply arrived for {to}",
    "wire.password": "wire recording: password recovered: {password} (from {via})",
    "wire.via": "{how}",
    "wire.no-password": "wire recording: no password recovered",
    "wire.message": "wire recording: the confidential message is readable",
    "wire.no-message": "wire recording: the message is not readable",
    "imap.login-in-clear": "IMAP: LOGIN taken in the clear (AUTH=PLAIN offered, no "
                           "LOGINDISABLED, no STARTTLS)",
    "imap.login-refused": "IMAP: LOGINDISABLED before STARTTLS, LOGIN refused with NO "
                          "[PRIVACYREQUIRED]; the password went inside TLS",
    "wire.octets": "wire recording: {clear} octets in clear, {tls} octets of TLS records",
    "vrfy.users": "accounts confirmed: {n} of {tried} names ({users})",
    "vrfy.nothing": "accounts confirmed: none of {tried} names",
    "expn.alias": "EXPN {alias}: {targets}",
    "mailbox.smuggled": "{user}'s mailbox: the smuggled message from the CEO is stored "
                        "(replies: {replies})",
    "mailbox.not-smuggled": "{user}'s mailbox: no smuggled message (replies: {replies})",
    "overflow.line-accepted": "a {octets}-octet command line was read and answered {code}",
    "overflow.line-refused": "the {octets}-octet command line was refused ({code}) after "
                             "512 octets",
    "overflow.rcpt": "{accepted} of {sent} recipients accepted; the server held {held} in "
                     "memory when the flood ended (about {kib} KiB)",
    "overflow.closed": "the session was closed after too many errors (421)",
    "guess.tries": "{n} passwords tried in {seconds} s (slowest answer {slowest} s)",
    "guess.found": "password of {user} found: {password} (over {via})",
    "guess.refused": "password of {user} not found; the guesser is blocked",
}

UI: dict[str, str] = {
    "yes": "yes",
    "no": "no",
    "list_sep": "; ",
    "title": "mailfort lab: each weakness on a legacy server and on mailfort",
    "intro": "Two mailfort servers on 127.0.0.1, same domain and users: a legacy profile "
             "with its protections switched off, and the hardened default. Nothing leaves "
             "this machine.",
    "legacy": "legacy profile",
    "hardened": "hardened mailfort",
    "attack": "attack",
    "attacker": "What the attacker does",
    "replies": "What each server answers",
    "consequence": "What the capture points show",
    "wire": "What an eavesdropper reads",
    "counter": "Countermeasure",
    "summary": "Summary",
    "succeeded": "ATTACK WORKS",
    "stopped": "stopped",
    "row": "row",
    "list": "Attacks (mailfort lab --attack NAME):",
    "starting": "Starting the lab (legacy and hardened servers, capture points)…",
    "stopped_lab": "Lab stopped; scratch data removed.",
}
