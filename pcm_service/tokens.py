"""Shared-secret tokens (the pool token workers present). Never logged, never in argv."""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Optional

from fastapi import Header, HTTPException


class TokenError(ValueError):
    pass


def read_token(path: str | Path) -> str:
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise TokenError(f"cannot read the token file {p}: {e.strerror}") from None
    if not token:
        raise TokenError(f"the token file {p} is empty")
    return token


def bearer_checker(expected: Optional[str], what: str = "pool token"):  # type: ignore[no-untyped-def]
    """A FastAPI dependency: 401 without a bearer token, 403 with a wrong one."""
    def check(authorization: Optional[str] = Header(default=None)) -> None:
        if expected is None:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, f"missing {what}: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(authorization[7:].strip().encode(), expected.encode()):
            raise HTTPException(403, f"wrong {what}")
    return check
