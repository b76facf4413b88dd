"""The checks; importing this package registers every one of them."""

from mailfort.audit.checks import (  # noqa: F401
    content,
    disclosure,
    dnschecks,
    imap,
    limits,
    managesieve,
    pop3,
    relay,
    smuggling,
    submission,
    tls,
)
