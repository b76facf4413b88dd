"""Ways a queue entry gets damaged on disk (a hand edit, a partial restore, a disk fault,
a bug), each with the reason the queue must give for it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mailfort.queue.store import Queue


def _edit(q: Queue, ident: str, change: Callable[[dict[str, object]], None]) -> None:
    path = q.env_dir / f"{ident}.json"
    d = json.loads(path.read_bytes())
    change(d)
    path.write_text(json.dumps(d))


def _missing_key(q: Queue, ident: str) -> None:
    _edit(q, ident, lambda d: d.pop("recipients"))


def _wrong_type(q: Queue, ident: str) -> None:
    # One recipient object where a list belongs: iterating it yields its keys.
    _edit(q, ident, lambda d: d.update(recipients=d["recipients"][0]))  # type: ignore[index]


def _truncated(q: Queue, ident: str) -> None:
    path = q.env_dir / f"{ident}.json"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])  # the recipients' addresses stay readable


def _empty(q: Queue, ident: str) -> None:
    (q.env_dir / f"{ident}.json").write_bytes(b"")


def _not_json(q: Queue, ident: str) -> None:
    (q.env_dir / f"{ident}.json").write_bytes(b"\x00\x00\x00 restored from tape \xff\n")


def _message_missing(q: Queue, ident: str) -> None:
    (q.msg_dir / ident).unlink()


def _state_missing(q: Queue, ident: str) -> None:
    (q.env_dir / f"{ident}.json").unlink()


# kind -> (damage, what the reason says)
DAMAGES: dict[str, tuple[Callable[[Queue, str], None], str]] = {
    "missing key": (_missing_key, "field recipients is missing"),
    "wrong type": (_wrong_type, "field recipients is not a non-empty list"),
    "truncated": (_truncated, "not JSON (truncated?)"),
    "empty": (_empty, "empty file"),
    "not JSON": (_not_json, "not UTF-8"),
    "message file missing": (_message_missing, "message file missing"),
    "state missing": (_state_missing, "state file missing"),
}


def corrupt_files(q: Queue, ident: str) -> set[str]:
    """The names of the entry's files in corrupt/ (the state file, the message)."""
    return {p.name for p in Path(q.root / "corrupt").glob(f"{ident}*")}


def kept_files(kind: str, ident: str) -> set[str]:
    """What of a damaged entry must be kept in corrupt/."""
    if kind == "message file missing":
        return {f"{ident}.json"}
    if kind == "state missing":
        return {ident}
    return {ident, f"{ident}.json"}
