"""English: why each weakness matters and how to close it."""

CHECKS: dict[str, dict[str, str]] = {
    "relay.open": {
        "title": "Open relay (third-party relay)",
        "why": "A server that accepts mail from anyone for anyone relays spam for strangers "
               "under its own name: its address ends up on blocklists and its own users' mail "
               "is refused. Old relay tests hide the foreign address in %-hacks, quoted local "
               "parts, source routes, bang paths and address literals, and forge a local "
               "sender for servers that relay for their own domain. The audit stops after "
               "RCPT and sends nothing, so it sees the acceptance, not the relaying; but a "
               "server that accepts a foreign recipient at RCPT and refuses only at the end "
               "of DATA is one content decision away from relaying, and one DATA reply "
               "answers every recipient, so a message for a local and a foreign user is "
               "either refused whole or relayed.",
        "fix": "Accept mail from unauthenticated clients only for local domains, and judge "
               "the recipient after parsing the address as RFC 5321 defines it: never treat "
               "%, !, a quoted @ or a source route as a routing instruction.",
        "postfix": "Keep smtpd_relay_restrictions = permit_mynetworks, "
                   "permit_sasl_authenticated, reject_unauth_destination; keep mynetworks to "
                   "the host itself; allow_percent_hack = no; swap_bangpath = no.",
    },
    "backscatter.unknown-user": {
        "title": "Backscatter (NDR spam): unknown users accepted",
        "why": "A server that accepts mail for users that do not exist bounces it later to "
               "the sender, and spammers forge that sender: the server mails their spam to "
               "innocent victims as non-delivery reports. Refusing such mail only at the end "
               "of DATA avoids the bounce for that message, but one DATA reply answers every "
               "recipient: a message for a known and an unknown user must be accepted (and "
               "bounced for the unknown one) or refused for both.",
        "fix": "Check recipients at RCPT time and refuse unknown ones with 550 5.1.1, so that "
               "nothing accepted needs to bounce.",
        "postfix": "Use smtpd_reject_unlisted_recipient = yes with complete local_recipient_maps "
                   "or virtual mailbox maps; for relay domains, relay_recipient_maps.",
    },
    "submission.no-auth": {
        "title": "Submission without authentication",
        "why": "Ports 587 and 465 exist so that users submit mail after proving who they are. "
               "Accepting MAIL there without AUTH makes the submission port an open door, the "
               "same as the old everything-on-port-25 design.",
        "fix": "On 587 and 465, answer MAIL before AUTH with 530 5.7.0 and relay only for "
               "authenticated users.",
        "postfix": "In master.cf for submission and submissions: -o smtpd_sasl_auth_enable=yes "
                   "-o smtpd_client_restrictions=permit_sasl_authenticated,reject.",
    },
    "submission.auth-before-tls": {
        "title": "SMTP-AUTH before TLS",
        "why": "AUTH PLAIN and LOGIN carry the password in base64, which is plaintext: offered "
               "before STARTTLS, every login can be read on the network.",
        "fix": "Offer and accept AUTH only inside TLS (538 5.7.11 before it), and only on the "
               "submission ports.",
        "postfix": "smtpd_tls_auth_only = yes; smtpd_tls_security_level = encrypt on "
                   "submission; no SASL on port 25.",
    },
    "submission.sender-forgery": {
        "title": "Authenticated users forge senders",
        "why": "An account that may use any MAIL FROM or From: lets one stolen password send "
               "mail in the name of anyone, including the organisation's own managers.",
        "fix": "Allow an authenticated user only their own addresses and aliases, in MAIL FROM "
               "and in the From: header (553 5.7.1 otherwise).",
        "postfix": "smtpd_sender_login_maps with reject_sender_login_mismatch (or "
                   "reject_authenticated_sender_login_mismatch) on submission; a header check "
                   "or milter for From:.",
    },
    "disclosure.banner": {
        "title": "Software name or version disclosed",
        "why": "A banner that names the software and its version tells an attacker which "
               "known vulnerabilities (such as old BOF holes) to try.",
        "fix": "Greet, answer EHLO, HELP, CAPA, CAPABILITY, errors and IMAP's ID without "
               "software name or version (ID: answer NIL).",
        "postfix": "smtpd_banner = $myhostname ESMTP (without $mail_name or $mail_version).",
    },
    "disclosure.vrfy-expn": {
        "title": "Account disclosure through VRFY/EXPN",
        "why": "VRFY and EXPN that confirm users or expand aliases let an attacker list the "
               "accounts to attack with password guessing or spam.",
        "fix": "Answer VRFY with 252 for every address and EXPN with 502. (RCPT must still "
               "refuse unknown users, which is expected and not a finding.)",
        "postfix": "disable_vrfy_command = yes.",
    },
    "tls.starttls": {
        "title": "STARTTLS on every SMTP, IMAP and ManageSieve port",
        "why": "Without TLS, mail and passwords cross the network in plaintext and can be read "
               "or changed on the way.",
        "fix": "Offer STARTTLS on 25, 587, 143 and 4190 and implicit TLS on 465 and 993, with a "
               "valid certificate.",
        "postfix": "smtpd_tls_cert_file, smtpd_tls_key_file, smtpd_tls_security_level = may "
                   "(25) / encrypt (587).",
    },
    "tls.pop3-stls": {
        "title": "STLS on POP3",
        "why": "POP3 carries passwords and every message; without TLS both are readable.",
        "fix": "Offer STLS on 110 and implicit TLS on 995.",
        "postfix": "Postfix does not serve POP3: configure the POP3 server (ssl = required).",
    },
    "pop3.plaintext-auth": {
        "title": "POP3 USER/PASS before TLS",
        "why": "A POP3 server that takes USER and PASS before STLS lets every mail client send "
               "its password in plaintext.",
        "fix": "Refuse USER, PASS and AUTH before STLS and do not advertise them in CAPA.",
        "postfix": "Postfix does not serve POP3: in the POP3 server disable plaintext auth "
                   "without TLS.",
    },
    "pop3.apop": {
        "title": "POP3 APOP",
        "why": "APOP is MD5 challenge-response: the password itself is not sent, but since "
               "the practical MD5 collision attacks of 2007 a man in the middle who poses as "
               "the server and picks the challenges recovers the password from the client's "
               "answers, and an eavesdropper can guess it offline from one captured exchange. "
               "The server must also keep every password in plaintext to check the digest.",
        "fix": "Do not offer APOP (no timestamp in the greeting); authenticate with USER/PASS "
               "or SASL PLAIN only inside TLS (STLS or port 995).",
        "postfix": "Postfix does not serve POP3: disable APOP in the POP3 server "
                   "(for Dovecot, drop apop from auth_mechanisms).",
    },
    "tls.versions": {
        "title": "TLS versions below 1.2",
        "why": "TLS 1.0 and 1.1 are deprecated (RFC 8996) and weaken every session that a "
               "downgrade can push to them.",
        "fix": "Accept TLS 1.2 and 1.3 only.",
        "postfix": "smtpd_tls_protocols = >=TLSv1.2 and smtpd_tls_mandatory_protocols = "
                   ">=TLSv1.2.",
    },
    "tls.ciphers": {
        "title": "Weak cipher classes",
        "why": "NULL ciphers do not encrypt, anonymous ones do not authenticate the server, "
               "EXPORT, RC4 and 3DES are broken.",
        "fix": "Offer only AEAD ciphers with forward secrecy.",
        "postfix": "smtpd_tls_ciphers = high; smtpd_tls_exclude_ciphers = aNULL, eNULL, "
                   "EXPORT, RC4, 3DES, MD5.",
    },
    "tls.certificate": {
        "title": "Certificate validity",
        "why": "An expired or unverifiable certificate teaches users to click through "
               "warnings and lets a man in the middle present his own.",
        "fix": "Use a certificate from a trusted CA for the server's name and renew it before "
               "expiry (a self-signed one is fine on a test host).",
        "postfix": "smtpd_tls_chain_files with the full chain; renew automatically.",
    },
    "tls.injection-smtp": {
        "title": "STARTTLS command injection (SMTP)",
        "why": "If commands sent in plaintext together with STARTTLS are executed after the "
               "handshake (CVE-2011-0411 class), a man in the middle can inject commands into "
               "the encrypted session.",
        "fix": "Discard everything buffered when STARTTLS is answered.",
        "postfix": "Upgrade: Postfix fixed this in 2.8.0 / 2.7.3 and later.",
    },
    "tls.injection-pop3": {
        "title": "STLS command injection (POP3)",
        "why": "The same injection as for SMTP: plaintext commands pipelined with STLS "
               "executed inside TLS.",
        "fix": "Discard everything buffered when STLS is answered.",
        "postfix": "Postfix does not serve POP3: upgrade the POP3 server.",
    },
    "imap.plaintext-auth": {
        "title": "IMAP LOGIN before TLS",
        "why": "An IMAP server that offers LOGIN or AUTH= mechanisms before STARTTLS, or "
               "answers AUTHENTICATE there with +, lets every mail client send its password "
               "in plaintext, readable on the network.",
        "fix": "Advertise LOGINDISABLED and no AUTH= mechanism before STARTTLS on 143, refuse "
               "LOGIN and AUTHENTICATE there with NO [PRIVACYREQUIRED] or BAD (before any +), "
               "and prefer implicit TLS on 993.",
        "postfix": "Postfix does not serve IMAP: in the IMAP server disable plaintext auth "
                   "without TLS (for Dovecot, disable_plaintext_auth = yes / "
                   "auth_allow_cleartext = no).",
    },
    "tls.injection-imap": {
        "title": "STARTTLS command injection (IMAP)",
        "why": "The same injection as for SMTP: plaintext commands pipelined with STARTTLS "
               "executed inside TLS (CVE-2011-0411 class, found in several IMAP servers).",
        "fix": "Discard everything buffered when STARTTLS is answered.",
        "postfix": "Postfix does not serve IMAP: upgrade the IMAP server.",
    },
    "managesieve.plaintext-auth": {
        "title": "ManageSieve AUTHENTICATE before TLS",
        "why": "A ManageSieve server (4190, RFC 5804) that lists SASL mechanisms before "
               "STARTTLS, or answers AUTHENTICATE there with a challenge, lets the mail "
               "client's Sieve editor send the mailbox password in plaintext.",
        "fix": "Before STARTTLS send an empty SASL capability with STARTTLS, and refuse "
               "AUTHENTICATE with NO (ENCRYPT-NEEDED) before any challenge.",
        "postfix": "Postfix does not serve ManageSieve: in the Sieve server disable plaintext "
                   "auth without TLS (for Dovecot's Pigeonhole, disable_plaintext_auth = yes / "
                   "auth_allow_cleartext = no).",
    },
    "tls.injection-managesieve": {
        "title": "STARTTLS command injection (ManageSieve)",
        "why": "The same injection as for SMTP: plaintext commands pipelined with STARTTLS "
               "executed inside TLS, where they act for the user who logs in next (a "
               "PUTSCRIPT could install a redirect of all mail).",
        "fix": "Discard everything buffered when STARTTLS is answered.",
        "postfix": "Postfix does not serve ManageSieve: upgrade the ManageSieve server.",
    },
    "limits.imap-literal": {
        "title": "IMAP literal limit (BOF)",
        "why": "An IMAP literal announces its size ({4294967295}) before its bytes: a server "
               "that answers + to any size, or sizes a buffer from it, can be made to hold "
               "gigabytes or overflow.",
        "fix": "Refuse a literal over the limit with a tagged NO or BAD before any byte is "
               "read (no + continuation); keep serving or close with BYE.",
        "postfix": "Postfix does not serve IMAP: keep the IMAP server's literal limits at "
                   "their defaults (for Dovecot, imap_max_line_length bounds them too).",
    },
    "limits.imap-line": {
        "title": "IMAP command line limit (BOF)",
        "why": "A server that holds a command line of any length can be made to hold "
               "megabytes per session, for as many sessions as it accepts; fixed buffers "
               "overflow (BOF). An IMAP answer to such a line proves it was held whole: the "
               "tagged reply echoes the tag, and the command stood at the line's end.",
        "fix": "Bound the command line (RFC 9051 §4 asks clients to keep to 8192 octets) and "
               "answer beyond it with BAD, or BYE and close.",
        "postfix": "Postfix does not serve IMAP: keep the IMAP server's line limit (for "
                   "Dovecot, imap_max_line_length, 64 KiB) at its default.",
    },
    "smuggling.end-of-data": {
        "title": "SMTP smuggling",
        "why": "If a server takes a bare LF or CR form of <CRLF>.<CRLF> as the end of data, an "
               "attacker can hide a second message with a forged sender inside a first one "
               "that passes SPF/DMARC of the relaying server.",
        "fix": "End DATA only at <CRLF>.<CRLF> and refuse messages with bare CR or LF.",
        "postfix": "smtpd_forbid_bare_newline = normalize (3.9) or yes; smtpd_data_restrictions "
                   "= reject_unauth_pipelining.",
    },
    "content.gtube": {
        "title": "No content filter (GTUBE accepted)",
        "why": "Most of the world's mail is spam, and what the envelope and DNS cannot prove "
               "(relay, blocklists, SPF/DKIM/DMARC) only a content filter can judge. GTUBE is "
               "the test line every spam filter takes for certain spam: a server that accepts "
               "it accepts the spam that gets past its envelope checks. The refusal must come "
               "at the end of DATA, in the session: a filter that accepts and then bounces "
               "sends backscatter. The audit sends the GTUBE message with the null sender to "
               "the known local user only, and, after a refusal, the same message without "
               "GTUBE as a control.",
        "fix": "Connect a content filter as a milter, asked at the end of DATA. For mailfort "
               "and rspamd (its proxy worker in milter mode, as Debian ships it), two lines "
               "in the configuration: [[milter]] and address = \"inet:127.0.0.1:11332\" "
               "(see README, \"Content filtering\"). A 4xx here means the filter is most "
               "likely unreachable: every message waits until it answers again.",
        "postfix": "smtpd_milters = inet:127.0.0.1:11332 (rspamd's proxy worker in milter "
                   "mode); non_smtpd_milters = $smtpd_milters; milter_default_action = "
                   "tempfail.",
    },
    "limits.long-line": {
        "title": "Overlong command line (BOF)",
        "why": "Old MTAs copied command lines into fixed buffers: a long line was a buffer "
               "overflow (BOF). Unbounded lines still exhaust memory.",
        "fix": "Bound the command line (RFC 5321: 512 octets) and answer 500 5.5.2 beyond it.",
        "postfix": "line_length_limit (default 2048) bounds it; keep the default.",
    },
    "limits.size": {
        "title": "Message size limit",
        "why": "A server without a size limit can be filled up by one client.",
        "fix": "Advertise SIZE, refuse a larger declared SIZE at MAIL (552 5.3.4) and a larger "
               "body at the end of DATA.",
        "postfix": "message_size_limit = 26214400 (or the size you need).",
    },
    "limits.recipients": {
        "title": "Recipients per message",
        "why": "Unbounded recipients let one message become a spam run and exhaust memory.",
        "fix": "Answer 452 4.5.3 beyond a recipient limit (for example 100).",
        "postfix": "smtpd_recipient_limit = 100 (or less).",
    },
    "limits.nul": {
        "title": "NUL bytes in commands",
        "why": "NUL bytes cut strings short in C code and confuse logging and filters "
               "(a classic vector of parser bugs).",
        "fix": "Refuse command lines that contain NUL.",
        "postfix": "Postfix refuses them; keep it current.",
    },
    "limits.idle-connections": {
        "title": "Connection exhaustion",
        "why": "A few idle or very slow clients must not take all the server's sessions "
               "(slowloris).",
        "fix": "Limit connections in all and per IP, and time out idle and slow sessions.",
        "postfix": "smtpd_client_connection_count_limit, smtpd_timeout, "
                   "anvil_rate_time_unit.",
    },
    "limits.liveness": {
        "title": "Still serving after the audit",
        "why": "Every bad input must get a reply and leave the server serving the next client.",
        "fix": "Make each limit answer and disconnect, never crash or wedge.",
        "postfix": "Check the mail log for panics and process restarts.",
    },
    "dns.mx": {
        "title": "MX record",
        "why": "Senders find the domain's mail servers through MX; without it they guess.",
        "fix": "Publish an MX record for the domain pointing to this server's name.",
        "postfix": "(DNS, not Postfix.)",
    },
    "dns.spf": {
        "title": "SPF record",
        "why": "SPF lets receivers refuse mail that forges the domain from foreign servers; a "
               "missing or +all record allows anyone.",
        "fix": "Publish one TXT record such as 'v=spf1 mx -all'.",
        "postfix": "(DNS, not Postfix.)",
    },
    "dns.dmarc": {
        "title": "DMARC record",
        "why": "DMARC tells receivers what to do with mail that fails SPF and DKIM for the "
               "domain in From:.",
        "fix": "Publish _dmarc.DOMAIN TXT 'v=DMARC1; p=quarantine' or p=reject.",
        "postfix": "(DNS, not Postfix.)",
    },
    "dns.dnsbl": {
        "title": "Listed on a DNSBL (RBL)",
        "why": "A server on a blocklist (RBL) has its mail refused by every receiver that "
               "uses the list, usually because it was an open relay or a spam source.",
        "fix": "Find and close the cause (open relay, backscatter, a compromised account), "
               "then ask the list for removal.",
        "postfix": "Check the mail log for relayed mail and compromised SASL accounts.",
    },
}

NOTES: dict[str, str] = {
    "port.closed": "port {port} ({service}) is closed",
    "port.none": "no {service} port given",
    "tls.none-offered": "no TLS offered on {services}: nothing to test (see tls.starttls)",
    "port.none-of": "none of these is open: {services}",
    "tls.not-offered": "{service} offers no TLS",
    "need.domain": "give --domain to run this check",
    "need.user": "give --domain and --user (a known local user) to run this check",
    "need.auth": "give --auth-user and --auth-password-file to run this check",
    "probe.drops": "the server dropped the session {n} times",
    "probe.error": "the probe failed: {error}",
    "internal.error": "the check failed inside the auditor: {error}",
    "greeting.refused": "{service} greets with {code} ({text}): the server refuses every "
                        "session (RFC 5321 §3.1), so this could not be tested",
    "tls.no-handshake": "{service} offers TLS but no handshake completed ({error}): nothing "
                        "could be tested there (see tls.starttls)",
    "apop.offered": "APOP offered: {where}",
    "apop.none": "no APOP timestamp in the greeting on {services}",
    "budget.spent": "the run's time budget was spent before this check",
    "budget.cut": "the run's time budget (--budget {budget} s) ran out during this check",
    "replies.uncounted": "no reply to QUIT within --timeout after {what} ({error}): the "
                         "replies could not be counted",
    "probe.no-reply": "no complete reply within --timeout to {what} ({error}): the server may "
                      "still act on it",
    "control.none": "no refusal can be trusted without a control: give --domain and --user "
                    "({tried} probes refused)",
    "control.known-refused": "control failed: the known user {address} is not accepted, so "
                             "refusals mean nothing",
    "control.own-refused": "control failed: {user} may not send as itself",
    "relay.accepted": "{n} of {tried} relay attempts accepted at RCPT (sender {senders}), "
                      "first: {first}; no message was sent, so relaying itself was not seen",
    "relay.ambiguous": "{n} local-looking relay forms accepted, but the server accepts every "
                       "local recipient (see backscatter), first: {first}",
    "relay.refused": "all {tried} relay attempts ({senders} senders) refused, the known user "
                     "accepted ({reconnects} reconnections)",
    "backscatter.accepted": "an unknown user at {domain} is accepted at RCPT, and a message "
                            "to them at the end of DATA ({code}): it must now be bounced or "
                            "dropped",
    "backscatter.data-refused": "an unknown user at {domain} is accepted at RCPT; a message "
                                "to them was refused at the end of DATA ({code}), so no "
                                "bounce was seen, but a message with a known user too "
                                "cannot be refused for the unknown one alone",
    "backscatter.rcpt-only": "an unknown user at {domain} is accepted at RCPT (the message "
                             "probe did not get past DATA: {code})",
    "backscatter.refused": "unknown users are refused at RCPT, the known user accepted",
    "submission.relayed": "MAIL and a foreign RCPT accepted without AUTH on {services}",
    "submission.mail-accepted": "MAIL accepted without AUTH on {services} (the foreign RCPT "
                                "was refused)",
    "submission.mail-refused": "MAIL refused before AUTH",
    "auth.cleartext": "AUTH before TLS: {where}",
    "auth.refused": "AUTH is neither offered nor accepted before TLS",
    "auth.failed": "the credentials of {user} were not accepted",
    "forgery.accepted": "an authenticated user may send as someone else: {what}",
    "forgery.null-sender": "an authenticated user may use the null sender <>",
    "forgery.refused": "foreign MAIL FROM, null sender and forged From: refused",
    "banner.version": "software version disclosed: {where}",
    "banner.name": "software name disclosed: {where}",
    "banner.clean": "no software name or version in banner, EHLO, HELP, errors or IMAP ID",
    "vrfy.leaks": "VRFY/EXPN tell users apart (known/unknown): {what}; {rcpt} (expected)",
    "vrfy.same": "VRFY/EXPN do not tell users apart: {what}; {rcpt} (expected)",
    "imap.cleartext": "a password can be sent in the clear: {what}",
    "imap.refused": "LOGINDISABLED advertised, no AUTH=, LOGIN and AUTHENTICATE refused "
                    "before STARTTLS",
    "imap.why.no-logindisabled": "no LOGINDISABLED before STARTTLS",
    "imap.why.auth": "{mechs} offered before STARTTLS",
    "imap.why.login-ok": "LOGIN accepted before STARTTLS",
    "imap.why.login-checked": "LOGIN before STARTTLS was checked (AUTHENTICATIONFAILED): the "
                              "password was taken in the clear",
    "imap.why.authenticate": "AUTHENTICATE PLAIN before STARTTLS answered + (it asks for "
                             "the credentials in the clear)",
    "sieve.cleartext": "a password can be sent in the clear: {what}",
    "sieve.refused": "no SASL mechanism before STARTTLS, AUTHENTICATE refused",
    "sieve.why.sasl": "SASL {mechs} offered before STARTTLS",
    "sieve.why.authenticate": "AUTHENTICATE PLAIN before STARTTLS answered with a challenge "
                              "(it asks for the credentials in the clear)",
    "literal.continued": "{service} answered + to a {n}-octet literal: it would read it",
    "literal.silent": "{service} neither refused nor continued a 4 GiB literal: it may be "
                      "waiting for its bytes",
    "literal.wedged": "{service} refused the 4 GiB literal but then answered no NOOP",
    "literal.closed": "{service} closed the session on the 4 GiB literal",
    "literal.dropped": "{service} dropped the connection on the 4 GiB literal without a BYE "
                       "(a crashed session?)",
    "literal.refused": "{service} refused the 4 GiB literal without +",
    "imap-line.held": "{service} answered a command at the end of a {n}-octet line: it held "
                      "the line whole",
    "imap-line.refused": "{service} refused a {n}-octet command line",
    "imap-line.closed": "{service} closed the session on a {n}-octet line",
    "pop3.cleartext": "a password can be sent in the clear: {what}",
    "pop3.refused": "USER/PASS and SASL are not offered or accepted before STLS",
    "tls.missing": "no TLS: {where}",
    "tls.everywhere": "TLS works on {services}",
    "tls.old-accepted": "accepted: {where}",
    "tls.old-refused": "TLS 1.0 and 1.1 refused",
    "tls.old-refused-partly": "TLS 1.0 and 1.1 refused (not testable here: {untestable})",
    "tls.untestable": "this client's OpenSSL cannot offer any of {untestable}: nothing tested",
    "tls.weak-accepted": "accepted: {where}",
    "tls.weak-refused": "no weak cipher class accepted",
    "tls.weak-refused-partly": "no weak cipher class accepted (not testable with this "
                               "OpenSSL: {untestable})",
    # Parts of the list fields above (registry.part), joined with UI["list_sep"].
    "cert.why.self-signed": "{service}: self-signed certificate",
    "cert.why.unknown-ca": "{service}: issued by a CA this client does not trust",
    "cert.why.expired-now": "{service}: certificate expired",
    "cert.why.not-yet-valid": "{service}: certificate not yet valid",
    "cert.why.name-mismatch": "{service}: certificate not issued for this host name",
    "cert.why.other": "{service}: {reason}",
    "cert.why.expired": "{service}: {date}",
    "cert.why.expires-soon": "{service}: expires in {days} days",
    "tls.why.not-offered": "{service}: not offered",
    "tls.why.stls-not-offered": "{service}: STLS not offered",
    "tls.why.error": "{service}: {error}",
    "pop3.why.capa": "CAPA {cap} before STLS",
    "pop3.why.user-ok": "USER answered +OK before STLS",
    "cert.expired": "expired: {where}",
    "cert.unverified": "the certificate does not verify: {where}",
    "cert.ok": "certificates verify and are not about to expire",
    "inject.answered": "a command pipelined with STARTTLS/STLS was answered inside TLS on "
                       "{services}",
    "inject.discarded": "pipelined plaintext discarded at the handshake on {services}",
    "content.accepted": "a message with the GTUBE line to {address} was accepted at the end "
                        "of DATA ({reply}): no content filter refused it",
    "content.tempfail": "tempfail: the GTUBE message got {reply} at the end of DATA, not a "
                        "refusal (filter unreachable?)",
    "content.refused": "the GTUBE message was refused at the end of DATA: {reply}; the same "
                       "message without GTUBE was accepted",
    "content.control-refused": "the GTUBE message was refused ({reply}), but so was the same "
                               "message without it ({control}): the refusal is not about "
                               "content",
    "content.odd-reply": "the GTUBE message got a reply that is no SMTP verdict: {reply}",
    "content.mail-refused": "MAIL FROM:<> was refused ({reply}): no message could be sent",
    "content.rcpt-refused": "the known user {address} was refused at RCPT ({reply}): no "
                            "message could be sent",
    "content.no-data": "DATA answered {reply}: no message could be sent",
    "smuggle.answered": "smuggled commands answered: {what}",
    "smuggle.one-reply": "{n} end-of-data variants, one reply each",
    "smuggle.no-data": "DATA answered {code}",
    "line.silent": "no reply to a {n}-octet line (the server may be stuck)",
    "line.closed": "the server closed the connection on a {n}-octet line",
    "line.accepted": "a {n}-octet command line was answered {code}: the server either cut it "
                     "(safe) or held it whole (memory exhaustion); this cannot be told "
                     "from outside",
    "line.refused": "a {n}-octet command line was refused with {code}",
    "size.none": "no SIZE limit advertised",
    "size.declared-accepted": "MAIL with SIZE={limit}+1 accepted",
    "size.declared-refused": "MAIL with SIZE above {limit} refused",
    "size.closed": "an over-size message ({limit}+1 octets) made the server close",
    "size.accepted": "an over-size message ({limit}+1 octets) was accepted",
    "size.refused": "declared and actual over-size ({limit}+1 octets) refused ({code})",
    "rcpt.mail-refused": "MAIL refused ({code})",
    "rcpt.all": "all {n} recipients accepted",
    "rcpt.limited": "{ok} of {n} recipients accepted",
    "nul.closed": "the server closed the connection on NUL",
    "nul.accepted": "MAIL with a NUL byte accepted ({code})",
    "nul.refused": "MAIL with a NUL byte refused ({code})",
    "idle.starved": "with {n} idle/slow connections a new client was not greeted: {error}",
    "idle.served": "with {n} idle/slow connections a new client was greeted in {s} s",
    "idle.refused": "with {n} idle/slow connections a new client got {code} (limit)",
    "live.dead": "no answer: {where}",
    "live.ok": "greeting on {services}",
    "dns.no-domain": "{domain} does not resolve",
    "dns.special-use": ("{domain} is a special-use name that the public DNS never holds "
                        "(give --resolver to ask a server that does)"),
    "dns.error": "DNS error for {domain}: {error}",
    "mx.none": "{domain} has no MX record",
    "mx.null": "{domain} has a null MX (accepts no mail)",
    "mx.ok": "MX: {hosts}",
    "spf.none": "{domain} has no SPF record",
    "spf.many": "{n} SPF records (a permanent error for receivers)",
    "spf.pass-all": "SPF allows every server: {record}",
    "spf.neutral": "SPF ends neutral: {record}",
    "spf.ok": "SPF: {record}",
    "dmarc.none": "{domain} has no DMARC record",
    "dmarc.many": "{domain} has several DMARC records",
    "dmarc.weak": "DMARC policy p={policy} (monitoring only)",
    "dmarc.ok": "DMARC policy p={policy}",
    "dnsbl.listed": "listed: {what}",
    "dnsbl.errors": "no DNSBL answered: {what}",
    "dnsbl.clean": "{ips} not listed on {zones}",
}

UI: dict[str, str] = {
    "yes": "yes",
    "no": "no",
    "list_sep": "; ",
    "report": "mailfort audit",
    "target": "target",
    "summary": "summary",
    "check": "check",
    "status": "status",
    "result": "result",
    "evidence": "evidence",
    "why": "why it matters",
    "fix": "how to fix",
    "postfix": "for Postfix",
    "row": "weakness row",
    "no_foreign": "No message is ever sent to a foreign domain: relay probes stop after RCPT.",
    "running": "running",
}
