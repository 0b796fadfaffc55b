"""What the command-line modules share: turning validation errors into one sentence."""

from __future__ import annotations

from pydantic import ValidationError


def validation_message(e: ValidationError, what: str) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "value"
    return f"invalid {what}: {where}: {first['msg']} (got {first.get('input')!r})."
