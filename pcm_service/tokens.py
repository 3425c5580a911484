"""Shared-secret tokens: the pool token workers present and the API token users present, and
the signatures peers put on chunk requests instead of the pool token.

A token comes from a file or the environment, or is generated on the service's first start
in its state directory (mode 0600 from the moment the file exists). Values are never logged,
never put in argv and never in a batch job's ad: only file paths and variable names are shown.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_STATE_DIR = Path("pcm-state")  # `pcm serve`'s default --state-dir


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class TokenKind:
    """One kind of token and the names it is found under."""
    what: str  # "pool token", "API token"
    filename: str  # in the service's state directory
    file_env: str  # variable naming a file that holds it
    value_env: str  # variable holding it (for the service and clients; never passed to workers)


POOL = TokenKind("pool token", "pool.token", "PCM_POOL_TOKEN_FILE", "PCM_POOL_TOKEN")
API = TokenKind("API token", "api.token", "PCM_API_TOKEN_FILE", "PCM_API_TOKEN")
# read-only: GET /metrics and nothing else (what Prometheus is given)
METRICS = TokenKind("metrics token", "metrics.token", "PCM_METRICS_TOKEN_FILE", "PCM_METRICS_TOKEN")
SECRET_ENV = (POOL.value_env, API.value_env, METRICS.value_env)  # removed from the environment of child workers


@dataclass(frozen=True)
class Token:
    """A token and where it came from; ``source`` (a path or a variable name) is safe to print."""
    value: str = field(repr=False)
    source: str
    path: Optional[Path] = None
    generated: bool = False


def open_to_others(path: Path, mode: int, what: str) -> Optional[str]:
    """Why a secret file (a token, a TLS key) may not be used: group or others can reach it."""
    if mode & 0o077:
        return f"the {what} {path} is open to group or others (mode {stat.filemode(mode)}): run `chmod 600 {path}`"
    return None


def read_token(path: str | Path) -> str:
    """The token in ``path``; a file others may read or write is refused, like ssh refuses keys."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        token = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise TokenError(f"cannot read the token file {p}: {e.strerror}") from None
    problem = open_to_others(p, mode, "token file")
    if problem:
        raise TokenError(problem)
    if not token:
        raise TokenError(f"the token file {p} is empty")
    return token


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner may enter (0700), made so or tightened whatever
    the umask: the state directory holds the tokens, the database, every prompt and result."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def private_file(path: Path, create: bool = True) -> None:
    """``path`` readable and writable by its owner alone (0600), created so (``create``) or
    tightened if it is there: the database, its WAL and shared-memory files."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def write_secret(path: Path, value: str) -> None:
    """``value`` as the whole content of ``path``, 0600 (a token handed on as a file); a file
    there before is tightened before it is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value)


def create_token_file(path: Path) -> str:
    """A new random token in a new file created 0600 (never readable by others, even briefly)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def new_worker_token() -> tuple[str, str]:
    """A worker's own credential and the digest the service keeps of it (never the token)."""
    token = secrets.token_urlsafe(32)
    return token, worker_token_digest(token)


def worker_token_digest(token: str) -> str:
    return hashlib.sha256(b"pcm worker token v1\n" + token.encode()).hexdigest()


def service_token(kind: TokenKind, file: Optional[Path], state_dir: Path) -> Token:
    """The service's token: ``file``, else $value_env, else state_dir/filename (made on first start)."""
    if file is not None:
        return Token(read_token(file), str(file), Path(file))
    value = os.environ.get(kind.value_env, "").strip()
    if value:
        return Token(value, f"${kind.value_env}")
    return state_token(kind, state_dir)


def state_token(kind: TokenKind, state_dir: Path) -> Token:
    """state_dir/filename: created on first use, read on later ones; the state directory is
    made (or tightened to) 0700 first."""
    path = Path(state_dir) / kind.filename
    try:
        private_dir(Path(state_dir))
        return Token(create_token_file(path), str(path), path, generated=True)
    except FileExistsError:
        return Token(read_token(path), str(path), path)
    except OSError as e:
        raise TokenError(f"cannot create the token file {path}: {e.strerror}") from None


def token_file(kind: TokenKind, file: Optional[Path] = None,
               default_dir: Path = DEFAULT_STATE_DIR) -> Optional[Path]:
    """A file holding the token: ``file``, else $file_env, else default_dir/filename if it exists."""
    if file is not None:
        return Path(file)
    if os.environ.get(kind.file_env):
        return Path(os.environ[kind.file_env])
    default = default_dir / kind.filename
    return default if default.is_file() else None


def client_token(kind: TokenKind, file: Optional[Path] = None,
                 default_dir: Path = DEFAULT_STATE_DIR) -> Optional[Token]:
    """What a client presents: ``file``, else $file_env, else $value_env, else default_dir/filename."""
    path = file or (Path(os.environ[kind.file_env]) if os.environ.get(kind.file_env) else None)
    if path is None:
        value = os.environ.get(kind.value_env, "").strip()
        if value:
            return Token(value, f"${kind.value_env}")
        path = token_file(kind, None, default_dir)
    return Token(read_token(path), str(path), path) if path is not None else None


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


# ----- peer chunk requests: signed, so the pool token never crosses the pool ---------------
# Peers serve chunks over plain HTTP (the bytes are verified by hash; a worker has no
# certificate). A request carries "PCM-Sig EXPIRES:HMAC" with HMAC-SHA256 over the method,
# the path and the expiry, keyed by a key derived from the pool token: a captured request
# gives neither the token nor a signature for any other chunk, and expires within minutes.
PEER_AUTH_SCHEME = "PCM-Sig"
PEER_SIG_LIFETIME = 60.0  # seconds a signature is good for
PEER_CLOCK_SKEW = 300.0  # tolerated clock difference between two workers of a pool


def peer_key(pool_token: str) -> bytes:
    return hmac.new(pool_token.encode(), b"pcm peer chunk requests v1", hashlib.sha256).digest()


def _peer_mac(key: bytes, method: str, path: str, expires: int) -> str:
    return hmac.new(key, f"{method}\n{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def sign_peer_request(key: bytes, method: str, path: str, now: Optional[float] = None) -> str:
    """The Authorization header value for one peer request."""
    expires = int((time.time() if now is None else now) + PEER_SIG_LIFETIME)
    return f"{PEER_AUTH_SCHEME} {expires}:{_peer_mac(key, method, path, expires)}"


def check_peer_signature(authorization: Optional[str], key: Optional[bytes], method: str, path: str,
                         now: Optional[float] = None) -> Optional[tuple[int, str]]:
    """None when allowed; else (401, why) without a signature or (403, why) with a bad one."""
    if key is None:
        return None
    scheme, _, cred = (authorization or "").partition(" ")
    if scheme != PEER_AUTH_SCHEME:
        return 401, (f"peers take signed requests ('Authorization: {PEER_AUTH_SCHEME} EXPIRES:HMAC'),"
                     " never a token")
    expires_text, _, mac = cred.strip().partition(":")
    if not expires_text.isdigit() or not mac:
        return 401, f"malformed {PEER_AUTH_SCHEME} credentials: want EXPIRES:HMAC"
    expires, now = int(expires_text), time.time() if now is None else now
    if not now - PEER_CLOCK_SKEW <= expires <= now + PEER_SIG_LIFETIME + PEER_CLOCK_SKEW:
        return 403, "the request's signature has expired (or the clocks differ by minutes)"
    if not hmac.compare_digest(mac.encode(), _peer_mac(key, method, path, expires).encode()):
        return 403, "wrong signature (not signed with this pool's token)"
    return None
