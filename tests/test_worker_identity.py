"""A worker's identity across the end of its life (a real `pcm serve`, an agent without an engine).

The race seen in CI: the factory removed a glidein (SIGTERM) just as its worker deregistered;
a heartbeat still in flight then got "unknown worker", so the stopping agent registered a
second time and exited without deregistering that one, which the service later declared lost.
Here the same sequence runs step by step, with no sleeps."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from pcm_service.client import ServiceClient, ServiceError
from pcm_service.protocol import FactoryReport, Glidein, GlideinState, Heartbeat, IdleReport
from tests.support.serve import ServeProcess
from worker_image.agent import PeerSettings, WorkerAgent


def workers(serve: ServeProcess) -> list[tuple[str, str]]:
    with sqlite3.connect(serve.state_dir / "pcm.sqlite3") as db:
        return db.execute("SELECT worker_id, state FROM workers ORDER BY registered_at").fetchall()


@pytest.fixture
def agent(serve: ServeProcess, tmp_path: Path) -> Iterator[WorkerAgent]:
    a = WorkerAgent(serve.worker_client(), work_dir=tmp_path / "w", glidein_id="local.1.1",
                    token=serve.pool_token, peers=PeerSettings(serve=False))
    a.join()
    yield a
    a._exited.set()  # stop its heartbeat thread


def glidein_exited(serve: ServeProcess) -> None:
    """The factory reports the glidein gone: the service declares its worker lost at once."""
    serve.client().request("POST", "/factory/report", FactoryReport(
        factory="f", backend="local", at=1.0,
        glideins=[Glidein(glidein_id="local.1.1", state=GlideinState.EXITED)]))


def test_a_heartbeat_after_deregistering_never_registers_a_second_worker(serve: ServeProcess,
                                                                         agent: WorkerAgent) -> None:
    first = agent.worker_id
    agent.leave()  # deregistered: the service retires it
    agent._send_heartbeat()  # the heartbeat that was in flight arrives after that
    assert workers(serve) == [(first, "retired")]
    assert agent.reg is not None
    r = httpx.post(f"{serve.url}/v1/pcm/workers/{first}/heartbeat", json={},
                   headers={"Authorization": f"Bearer {agent.reg.worker_token}"})
    assert r.status_code == 410 and r.json()["code"] == "worker_retired"


def test_a_stopping_worker_declared_lost_does_not_come_back(serve: ServeProcess, agent: WorkerAgent) -> None:
    first = agent.worker_id
    agent.request_drain()  # SIGTERM from the batch system
    glidein_exited(serve)
    agent._send_heartbeat()
    assert workers(serve) == [(first, "lost")]
    with pytest.raises(ServiceError) as e:
        agent._call("POST", "/idle", IdleReport(idle_seconds=1))
    assert (e.value.status, e.value.code) == (404, "worker_lost")


def test_a_live_worker_declared_lost_registers_again(serve: ServeProcess, agent: WorkerAgent) -> None:
    first = agent.worker_id
    glidein_exited(serve)  # e.g. the factory saw it vanish for a moment; the agent runs on
    agent._send_heartbeat()
    (w1, s1), (w2, s2) = workers(serve)
    assert (w1, s1) == (first, "lost") and w2 == agent.worker_id != first and s2 == "starting"


def test_unknown_and_retired_workers_get_different_answers(serve: ServeProcess) -> None:
    client: ServiceClient = serve.worker_client()
    with pytest.raises(ServiceError) as e:
        client.request("POST", "/workers/w-nobody/heartbeat", Heartbeat())
    assert (e.value.status, e.value.code) == (404, "worker_unknown")
