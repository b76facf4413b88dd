"""The one table of the weaknesses mailfort closes: number, key and name in each language.

Everything that numbers a weakness reads it here: the audit's ``row`` (in its JSON and
HTML), the lab's ①… marks, and the README's table (a test keeps that table equal to this
one). Rows 1 to 6 are the study text's ①–⑤ on SMTP's weaknesses, with its ② split into
open relay (2) and backscatter (3); 7 (blocklists, forged senders) and ``+`` complete what
an attacker on the wire does; 8 to 10 are what a server must also survive. Numbers are
strings because ``+`` (SMTP smuggling, a modern variant of 6) is one; the audit's JSON
schema publishes them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Weakness:
    number: str
    key: str
    en: str
    ja: str

    @property
    def mark(self) -> str:
        """The number as one character: ① for 1 … ⑳ for 20, ``+`` as it is."""
        return chr(0x2460 + int(self.number) - 1) if self.number.isdigit() else self.number

    def name(self, lang: str) -> str:
        return self.ja if lang == "ja" else self.en


TABLE: tuple[Weakness, ...] = (
    Weakness("1", "one-door", "one door for submission and relay",
             "メールの投稿と中継が同じ仕組み"),
    Weakness("2", "open-relay", "open relay (no authentication)",
             "第三者中継(オープンリレー)"),
    Weakness("3", "backscatter", "backscatter (NDR spam)", "NDRスパム(バックスキャッタ)"),
    Weakness("4", "plaintext", "plaintext", "平文の通信"),
    Weakness("5", "disclosure", "account disclosure", "アカウント情報の漏洩"),
    Weakness("6", "overflow", "overflow / exhaustion", "BOF・資源の枯渇"),
    Weakness("+", "smuggling", "SMTP smuggling", "SMTPスマグリング"),
    Weakness("7", "spam-sources", "spam sources and forged senders",
             "迷惑メールの送信元と送信者の詐称"),
    Weakness("8", "guessing", "password guessing", "パスワードの推測"),
    Weakness("9", "service-account", "a compromised service account",
             "乗っ取られたサービスアカウント"),
    Weakness("10", "failing-disk", "a failing disk", "ディスクの障害"),
)

NUMBERS: tuple[str, ...] = tuple(w.number for w in TABLE)
_BY_NUMBER = {w.number: w for w in TABLE}
_BY_KEY = {w.key: w for w in TABLE}


def by_number(number: str) -> Weakness:
    """The row numbered ``number``; KeyError names the numbers there are."""
    try:
        return _BY_NUMBER[number]
    except KeyError:
        raise KeyError(f"no weakness numbered {number!r} (have: {', '.join(NUMBERS)})") from None


def by_key(key: str) -> Weakness:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"no weakness {key!r} (have: {', '.join(_BY_KEY)})") from None
