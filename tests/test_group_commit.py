"""Group commit of the hot worker calls: several calls, one transaction and one commit; a call
that fails is undone alone; no answer before its commit."""
from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from pcm_service.api.committer import GroupCommitter
from pcm_service.store import Store


def put(store: Store, key: str) -> str:
    with store.transaction() as db:
        db.execute("INSERT INTO settings (key, value) VALUES (?, 'v')", (key,))
    return key


def committed_keys(path: Path) -> set[str]:
    """What another connection sees: only what is committed."""
    conn = sqlite3.connect(path)
    try:
        return {k for (k,) in conn.execute("SELECT key FROM settings")}
    finally:
        conn.close()


def test_run_group_undoes_a_failing_call_alone_and_commits_the_rest_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    commits: list[str] = []
    store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    hooks: list[str] = []

    def failing() -> str:
        put(store, "b")  # written, then undone with its call
        raise ValueError("refused")

    def with_hook() -> str:
        store.after_commit(lambda: hooks.append(",".join(sorted(committed_keys(store.path)))))
        return put(store, "c")

    out = store.run_group([lambda: put(store, "a"), failing, with_hook])
    assert out[0] == "a" and isinstance(out[1], ValueError) and out[2] == "c"
    assert committed_keys(store.path) == {"a", "c"}
    assert len(commits) == 1
    assert hooks == ["a,c"]  # run after the commit, not inside the group
    store.close()


def test_committer_answers_each_call_after_its_commit_and_groups_concurrent_calls(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    commits: list[str] = []
    store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    committer = GroupCommitter(store)
    n = 200

    async def one(i: int) -> None:
        key = await committer.call(put, store, f"k{i}")
        assert key in committed_keys(store.path)  # durable before it was answered

    async def bad() -> None:
        with pytest.raises(sqlite3.IntegrityError):
            await committer.call(put, store, "k0")  # a duplicate key: refused, alone

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.gather(bad(), one(n))

    try:
        asyncio.run(main())
    finally:
        committer.stop()
    assert committed_keys(store.path) == {f"k{i}" for i in range(n + 1)}
    assert len(commits) < n / 4, f"{len(commits)} commits for {n + 2} concurrent calls: not grouped"
    store.close()
