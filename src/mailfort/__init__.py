"""mailfort: a secure-by-default mail server and SMTP security auditor."""
__version__ = "0.1.0"
