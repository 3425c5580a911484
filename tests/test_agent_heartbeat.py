"""When the agent heartbeats (no engine, no service call): on a change of what the service
derives its state from, when no lease or report showed it alive within an interval, and at
least every FULL_HEARTBEAT_EVERY intervals, so the service reconciles the batches it holds.
A busy worker's leases and reports keep it alive (tests/test_core.py checks the service's side)."""
from __future__ import annotations

import time
from pathlib import Path

from pcm_service.client import ServiceClient
from pcm_service.protocol import BatchLease, ContextState, RowTask, SamplingSettings
from worker_image.agent import FULL_HEARTBEAT_EVERY, PeerSettings, WorkerAgent

EVERY = 2.0


def beat_now(agent: WorkerAgent) -> None:
    """As if a heartbeat had just been answered."""
    agent._beat = (agent._state(agent.ledger.holding().inflight_batches), time.monotonic())


def test_a_busy_agent_heartbeats_on_changes_and_every_fifth_interval(tmp_path: Path) -> None:
    agent = WorkerAgent(ServiceClient("http://127.0.0.1:9"), work_dir=tmp_path, peers=PeerSettings(serve=False))
    assert agent._heartbeat_due(EVERY), "the first heartbeat is always sent"
    beat_now(agent)
    agent._alive_shown_at = time.monotonic()
    assert not agent._heartbeat_due(EVERY), "nothing changed and a call just showed it alive"
    agent.context_state = ContextState.READY
    assert agent._heartbeat_due(EVERY), "its context became ready"
    beat_now(agent)
    agent.ledger.leased([BatchLease(batch_id=1, workload_id="w", context_id="c", sampling=SamplingSettings(),
                                    rows=[RowTask(idx=0, row_id="0", prompt="p")])], 1)
    assert agent._heartbeat_due(EVERY), "it became busy"
    beat_now(agent)
    assert not agent._heartbeat_due(EVERY)
    agent._alive_shown_at = time.monotonic() - EVERY
    assert agent._heartbeat_due(EVERY), "no lease or report within an interval"
    agent._alive_shown_at = time.monotonic()
    agent._beat = (agent._beat[0], time.monotonic() - FULL_HEARTBEAT_EVERY * EVERY)
    assert agent._heartbeat_due(EVERY), "every FULL_HEARTBEAT_EVERY intervals, busy or not"
    beat_now(agent)
    agent.retiring = True
    assert agent._heartbeat_due(EVERY), "it is leaving"
