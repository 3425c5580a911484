"""The model policy at time of use: a model passes the policy at registration, then one of
its directories becomes a symlink (or another directory) or one of its files a hard link to a
secret. The origin must refuse to read it, not serve a byte of the secret: it opens every
component without following links and only the inode that was checked."""
from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from pcm_service.protocol import ModelManifest
from pcm_service.weights.chunks import RateLimiter, build_manifest, read_pieces
from pcm_service.weights.modelpaths import ModelPolicy, ModelUnavailable
from tests.support.models import fake_model
from tests.support.serve import ServeProcess

SECRET = b"SECRET-TOKEN-0123456789abcdef\n"


def read_all(path: Path, length: int) -> bytes:
    """What the origin route sends for a chunk of ``path`` (its read_pieces)."""
    return b"".join(read_pieces(path, 0, length, RateLimiter()))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ModelPolicy, Path, Path]:
    """A model (with a subdirectory) under a root, and a secret place outside it shaped like it."""
    root = tmp_path / "root"
    model = fake_model(root / "m")
    (model / "sub").mkdir()
    (model / "sub" / "weights.bin").write_bytes(b"w" * len(SECRET))
    (model / "model.safetensors").write_bytes(b"m" * len(SECRET))
    secret = tmp_path / "state"
    (secret / "sub").mkdir(parents=True)
    for f in (secret / "sub" / "weights.bin", secret / "model.safetensors", secret / "api.token"):
        f.write_bytes(SECRET)
    return ModelPolicy.of([root], [secret / "api.token"]), model, secret


def symlink_dir(model: Path, secret: Path) -> None:
    shutil.rmtree(model / "sub")
    (model / "sub").symlink_to(secret / "sub", target_is_directory=True)


def rename_dir(model: Path, secret: Path) -> None:  # a real directory, not a link: only the inode tells
    os.rename(model / "sub", secret / "old-sub")
    os.rename(secret / "sub", model / "sub")


def hard_link(model: Path, secret: Path) -> None:
    (model / "sub" / "weights.bin").unlink()
    os.link(secret / "sub" / "weights.bin", model / "sub" / "weights.bin")


def model_dir_symlink(model: Path, secret: Path) -> None:  # the model's own directory swapped
    shutil.copy(secret / "model.safetensors", secret / "sub" / "model.safetensors")
    shutil.copy(model / "config.json", secret / "sub" / "config.json")
    os.rename(model, model.with_name("old-m"))
    model.symlink_to(secret / "sub", target_is_directory=True)


def fifo(model: Path, secret: Path) -> None:  # opening it must not hang the origin
    (model / "sub" / "weights.bin").unlink()
    os.mkfifo(model / "sub" / "weights.bin")


SWAPS: dict[str, Callable[[Path, Path], None]] = {
    "directory-symlink": symlink_dir, "directory-renamed": rename_dir, "hard-link": hard_link,
    "model-dir-symlink": model_dir_symlink, "fifo": fifo}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("swap", list(SWAPS))
def test_a_swap_after_registration_is_refused_not_followed(setup: tuple[ModelPolicy, Path, Path],
                                                           swap: str) -> None:
    policy, model, secret = setup
    files = policy.check(model)
    build_manifest(files)
    rel = "model.safetensors" if swap == "model-dir-symlink" else "sub/weights.bin"
    assert read_all(files[rel], len(SECRET)) == (model / rel).read_bytes()  # before: served
    SWAPS[swap](model, secret)
    with pytest.raises(OSError):
        read_all(files[rel], len(SECRET))
    with pytest.raises(OSError):  # nor hashed into a manifest
        build_manifest(files)
    if swap != "model-dir-symlink":  # the untouched files still read
        assert read_all(files["config.json"], 2) == b"{}"


def test_hard_links_must_have_every_name_in_the_model(setup: tuple[ModelPolicy, Path, Path]) -> None:
    policy, model, secret = setup
    os.link(model / "model.safetensors", model / "sub" / "same.bin")  # both names checked: fine
    files = policy.check(model)
    assert read_all(files["sub/same.bin"], len(SECRET)) == b"m" * len(SECRET)
    os.link(secret / "model.safetensors", model / "other.bin")  # the other name is in the state dir
    with pytest.raises(ModelUnavailable, match="2 hard links, 1 of them in the model"):
        policy.check(model)


# ----- the real origin: a `pcm serve`, its blob route, the pool token ----------------------

@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    (tmp_path / "root").mkdir()
    s = ServeProcess(tmp_path / "state", model_roots=[tmp_path / "root"]).start()
    yield s
    s.stop()


def secrets_of(serve: ServeProcess) -> list[bytes]:
    db = (serve.state_dir / "pcm.sqlite3").read_bytes()
    return [serve.api_token.encode(), serve.pool_token.encode(), db[:16], db[100:4096]]


def test_the_origin_serves_no_byte_of_the_state_after_a_swap(serve: ServeProcess, tmp_path: Path) -> None:
    """The issue's finding: a model directory called ``state`` registered with look-alike files,
    then swapped for a link to the real state dir; a weight file swapped for a hard link to the
    API token. Every chunk GET with the pool token is refused and carries none of the secrets."""
    model = fake_model(tmp_path / "root" / "m")
    token_len = serve.api_token_file.stat().st_size
    (model / "model.safetensors").write_bytes(b"m" * token_len)
    (model / "state").mkdir()
    (model / "state" / "api.token").write_bytes(b"t" * token_len)
    (model / "state" / "pcm.sqlite3").write_bytes(b"d" * 4096)
    api = {"Authorization": f"Bearer {serve.api_token}"}
    pool = {"Authorization": f"Bearer {serve.pool_token}"}
    r = httpx.post(f"{serve.url}/v1/pcm/models", json={"path": str(model)}, headers=api)
    assert r.status_code == 201, r.text
    m = ModelManifest.model_validate(r.json())
    chunks = {f.path: f.chunks[0] for f in m.files}
    for chunk in chunks.values():  # before the swap the origin serves them
        r = httpx.get(f"{serve.url}/v1/pcm/blobs/{chunk}", headers=pool)
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == chunk
    with sqlite3.connect(serve.state_dir / "pcm.sqlite3") as db:  # a prompt in the live database
        assert db.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 1
    shutil.rmtree(model / "state")
    (model / "state").symlink_to(serve.state_dir, target_is_directory=True)
    (model / "model.safetensors").unlink()
    os.link(serve.api_token_file, model / "model.safetensors")
    secrets = secrets_of(serve)
    for rel in ("state/api.token", "state/pcm.sqlite3", "model.safetensors"):
        for headers in ({}, {"Range": "bytes=0-"}, {"Range": "bytes=1-8"}):
            try:
                r = httpx.get(f"{serve.url}/v1/pcm/blobs/{chunks[rel]}", headers={**pool, **headers})
            except httpx.HTTPError:  # a body cut short is a refusal too; none of it may be a secret
                continue
            assert r.status_code >= 400, (rel, headers, r.status_code)
            assert not any(s in r.content for s in secrets), (rel, headers)
    r = httpx.get(f"{serve.url}/v1/pcm/blobs/{chunks['config.json']}", headers=pool)
    assert r.status_code == 200 and r.content == b"{}"  # the rest of the model is still served
    assert serve.api_token not in serve.log_path.read_text()
