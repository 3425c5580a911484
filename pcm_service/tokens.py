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


def check_bearer(authorization: Optional[str], expected: Optional[str],
                 what: str = "pool token") -> Optional[tuple[int, str]]:
    """None when allowed; else (401, why) without a bearer token or (403, why) with a wrong one."""
    if expected is None:
        return None
    if not authorization or not authorization.startswith("Bearer "):
        return 401, f"missing {what}: send 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(authorization[7:].strip().encode(), expected.encode()):
        return 403, f"wrong {what}"
    return None


def bearer_checker(expected: Optional[str], what: str = "pool token"):  # type: ignore[no-untyped-def]
    """A FastAPI dependency applying ``check_bearer``."""
    def check(authorization: Optional[str] = Header(default=None)) -> None:
        refused = check_bearer(authorization, expected, what)
        if refused is not None:
            headers = {"WWW-Authenticate": "Bearer"} if refused[0] == 401 else None
            raise HTTPException(refused[0], refused[1], headers=headers)
    return check
