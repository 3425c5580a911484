"""Spot-check audits (security issue 28, item 7), as BOINC does them: a worker with its own
credential can still return made-up text for the batches leased to it, so a sample of
finished batches (``WorkerTrust.audit_fraction``) is run again by a worker of another host and
the two answers compared. The first answer stays the rows' result; the audit copy is a batch
row with ``audit_of`` set whose results go to ``audit_results``, never to ``rows``.

- **A host** is the address the service saw the worker register from (``workers.address``),
  or, for a worker on the service's own machine (loopback) or in-process, where the address
  says nothing, the host name it declares. The submit host is trusted, so the name is enough
  there (and it is how tests run two "hosts"); a glidein cannot pick its address.
- **Agreement:** rows sampled greedily (temperature 0, the workload's or the row's own
  setting) must have the same text; sampled rows and rows that ended with an error on either
  side are not compared. An audit agrees when at least ``audit_agreement`` of its compared
  rows match (1.0: all; lower it where GPUs of different kinds may differ).
- **Who is wrong:** with two answers nobody can tell. The rule: a disagreement is a strike
  against the original's host, unless the auditor's host is barred (a barred host's word counts
  for nothing). A host with ``audit_bar_after`` strikes is barred: its workers get no more
  leases, what they hold is requeued, and every row they finished in a running workload is
  reset and run again. (A third opinion, BOINC's quorum, would also protect an honest host
  whose batches a liar audits first; not done yet.)
- **Completion** waits for a workload's open audits, so its output is written once, from
  answers that passed them; an audit no live unbarred worker of another host could run is
  dropped when the workload's rows are all done (one host: nobody can audit).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Optional

from pcm_service.core.results import maybe_complete, requeue, row_identity
from pcm_service.core.trust import WorkerTrust
from pcm_service.protocol import (
    LIVE_WORKER_STATES,
    BatchReport,
    BatchState,
    RowState,
    SamplingSettings,
    WorkloadState,
)
from pcm_service.protocol.status import HostAudit
from pcm_service.store import MANAGER_KIND, RUNS_ROWS, Store, in_list


def sampled_for_audit(batch_id: int, fraction: float) -> bool:
    """A deterministic sample (the same batch always gets the same answer; 1.0: every batch)."""
    h = int.from_bytes(hashlib.sha256(str(batch_id).encode()).digest()[:8], "big")
    return h < fraction * 2**64


def _greedy(workload_sampling: SamplingSettings, request: Optional[str]) -> bool:
    own = json.loads(request).get("sampling") if request else None
    temperature = own.get("temperature", 0.0) if own else workload_sampling.temperature
    return bool(temperature == 0)


class Audits:
    """Audit copies of finished batches, their results, strikes and barred hosts. The lease
    side (core/leasing.py) calls ``maybe_audit`` as a batch finishes and ``record_audit`` with
    an audit copy's report, inside its own transaction."""

    def __init__(self, store: Store, trust: WorkerTrust) -> None:
        self.store, self.trust = store, trust

    def _barred(self, db: sqlite3.Connection, w: sqlite3.Row) -> bool:
        return db.execute("SELECT 1 FROM barred_hosts WHERE host=?", (row_identity(w),)).fetchone() is not None

    def maybe_audit(self, db: sqlite3.Connection, now: float, batch_id: int) -> None:
        """A batch just finished: if sampled, queue its audit copy, for a worker of another host."""
        trust = self.trust
        if not sampled_for_audit(batch_id, trust.audit_fraction):
            return
        b = db.execute("SELECT b.workload_id, b.context_id, w.host, w.address, w.worker_id FROM batches b"
                       " JOIN workers w USING (worker_id) WHERE b.batch_id=? AND b.audit_of IS NULL",
                       (batch_id,)).fetchone()
        if b is None or db.execute("SELECT 1 FROM rows WHERE batch_id=? AND error IS NULL LIMIT 1",
                                   (batch_id,)).fetchone() is None:
            return  # an audit copy itself, or nothing but errors to compare
        audit = db.execute("INSERT INTO batches (workload_id, context_id, state, audit_of) VALUES (?,?,?,?)"
                           " RETURNING batch_id",
                           (b["workload_id"], b["context_id"], BatchState.QUEUED.value, batch_id)).fetchone()[0]
        db.execute("INSERT INTO audits (audit_batch, batch_id, workload_id, original_worker, original_host,"
                   " created_at) VALUES (?,?,?,?,?,?)",
                   (audit, batch_id, b["workload_id"], b["worker_id"], row_identity(b), now))

    def record_audit(self, db: sqlite3.Connection, now: float, worker_id: str, b: sqlite3.Row,
                      rep: BatchReport) -> None:
        """An auditor's answers: kept aside; once every row has one, compared with the original's."""
        if db.execute("SELECT state FROM batches WHERE batch_id=?", (b["batch_id"],)).fetchone()[0] \
                != BatchState.LEASED.value:
            return  # a late duplicate of a finished audit
        db.executemany("INSERT OR IGNORE INTO audit_results (audit_batch, idx, text, error) VALUES (?,?,?,?)",
                       [(b["batch_id"], r.idx, r.text, r.error) for r in rep.results])
        want = db.execute("SELECT COUNT(*) FROM rows WHERE batch_id=? AND state=? AND error IS NULL",
                          (b["audit_of"], RowState.DONE.value)).fetchone()[0]
        have = db.execute("SELECT COUNT(*) FROM audit_results r JOIN rows o ON o.workload_id=? AND o.idx=r.idx"
                          " AND o.batch_id=? AND o.error IS NULL WHERE r.audit_batch=?",
                          (b["workload_id"], b["audit_of"], b["batch_id"])).fetchone()[0]
        if have < want:
            if rep.returned or rep.crashed:
                requeue(db, "batch_id=?", (b["batch_id"],))
            return
        self._settle_audit(db, now, worker_id, b)

    def _settle_audit(self, db: sqlite3.Connection, now: float, worker_id: str, b: sqlite3.Row) -> None:
        sampling = SamplingSettings.model_validate_json(db.execute(
            "SELECT sampling FROM workloads WHERE workload_id=?", (b["workload_id"],)).fetchone()[0])
        compared = matched = 0
        for r in db.execute("SELECT o.text, o.error, o.request, a.text AS audit_text, a.error AS audit_error"
                            " FROM rows o JOIN audit_results a ON a.audit_batch=? AND a.idx=o.idx"
                            " WHERE o.workload_id=? AND o.batch_id=?",
                            (b["batch_id"], b["workload_id"], b["audit_of"])):
            if r["error"] is None and r["audit_error"] is None and _greedy(sampling, r["request"]):
                compared += 1
                matched += r["text"] == r["audit_text"]
        agreed = compared == 0 or matched >= self.trust.audit_agreement * compared
        auditor = db.execute("SELECT host, address FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
        auditor_host = row_identity(auditor)
        db.execute("UPDATE audits SET auditor_worker=?, auditor_host=?, rows_compared=?, rows_matched=?,"
                   " agreed=?, finished_at=? WHERE audit_batch=?",
                   (worker_id, auditor_host, compared, matched, agreed, now, b["batch_id"]))
        db.execute("UPDATE batches SET state=? WHERE batch_id=?", (BatchState.DONE.value, b["batch_id"]))
        a = db.execute("SELECT original_host, tiebreak_of FROM audits WHERE audit_batch=?", (b["batch_id"],)).fetchone()
        if a["tiebreak_of"] is not None:  # the third opinion: the one of the two it disagrees with lied
            first = db.execute("SELECT auditor_host FROM audits WHERE audit_batch=?", (a["tiebreak_of"],)).fetchone()
            self._strike(db, now, first[0] if agreed else a["original_host"], b["batch_id"])
        elif not agreed and not self._barred(db, auditor):
            if self._third_host(db, a["original_host"], auditor_host):
                self._tie_break(db, now, b, auditor_host)
            else:  # two hosts only: the auditor's word against the original's, the original answers for it
                self._strike(db, now, a["original_host"], b["batch_id"])
        maybe_complete(db, now, b["workload_id"])

    def _third_host(self, db: sqlite3.Connection, *hosts: str) -> bool:
        live, states = in_list(LIVE_WORKER_STATES)
        marks, names = in_list(hosts)
        return db.execute(f"SELECT 1 FROM workers WHERE state IN {live} AND {RUNS_ROWS}"
                          f" AND COALESCE(address, host) NOT IN {marks}"
                          " AND COALESCE(address, host) NOT IN (SELECT host FROM barred_hosts) LIMIT 1",
                          (*states, MANAGER_KIND, *names)).fetchone() is not None

    def _tie_break(self, db: sqlite3.Connection, now: float, b: sqlite3.Row, auditor_host: str) -> None:
        """Two hosts disagree: a third runs the batch again, and the one it disagrees with is struck
        (BOINC's quorum), so a liar auditing an honest host's batch cannot get that host barred."""
        first = db.execute("SELECT * FROM audits WHERE audit_batch=?", (b["batch_id"],)).fetchone()
        again = db.execute("INSERT INTO batches (workload_id, context_id, state, audit_of) SELECT workload_id,"
                           " context_id, ?, batch_id FROM batches WHERE batch_id=? RETURNING batch_id",
                           (BatchState.QUEUED.value, first["batch_id"])).fetchone()[0]
        db.execute("INSERT INTO audits (audit_batch, batch_id, workload_id, original_worker, original_host,"
                   " created_at, excluded_host, tiebreak_of) VALUES (?,?,?,?,?,?,?,?)",
                   (again, first["batch_id"], b["workload_id"], first["original_worker"], first["original_host"],
                    now, auditor_host, b["batch_id"]))

    def _strike(self, db: sqlite3.Connection, now: float, host: str, audit_batch: int) -> None:
        db.execute("INSERT OR IGNORE INTO strikes (host, audit_batch, at) VALUES (?,?,?)", (host, audit_batch, now))
        if db.execute("SELECT COUNT(*) FROM strikes WHERE host=?", (host,)).fetchone()[0] \
                >= self.trust.audit_bar_after:
            self._bar(db, now, host)

    def _bar(self, db: sqlite3.Connection, now: float, host: str) -> None:
        """No more leases for this host; what it holds is requeued, what it finished run again."""
        if db.execute("INSERT OR IGNORE INTO barred_hosts (host, barred_at) VALUES (?,?)", (host, now)).rowcount == 0:
            return
        theirs = "SELECT worker_id FROM workers WHERE COALESCE(address, host)=?"
        requeue(db, f"worker_id IN ({theirs})", (host,))
        mine = (f"state=? AND worker_id IN ({theirs})"
                " AND workload_id IN (SELECT workload_id FROM workloads WHERE state=?)")
        params = (RowState.DONE.value, host, WorkloadState.RUNNING.value)
        reset = db.execute(f"SELECT workload_id, batch_id, error IS NOT NULL AS failed FROM rows WHERE {mine}",
                           params).fetchall()
        db.execute("UPDATE rows SET state=?, text=NULL, finish_reason=NULL, prompt_tokens=NULL,"
                   " completion_tokens=NULL, error=NULL, error_code=NULL, choices=NULL, worker_id=NULL,"
                   f" finished_at=NULL WHERE {mine}", (RowState.PENDING.value, *params))
        counts: dict[str, list[int]] = {}
        for r in reset:
            c = counts.setdefault(r["workload_id"], [0, 0])
            c[0], c[1] = c[0] + 1, c[1] + r["failed"]
        db.executemany("UPDATE workloads SET rows_done=rows_done-?, rows_failed=rows_failed-? WHERE workload_id=?",
                       [(done, failed, wl) for wl, (done, failed) in counts.items()])
        marks, ids = in_list({r["batch_id"] for r in reset})
        db.execute(f"UPDATE batches SET state=?, worker_id=NULL WHERE state=? AND batch_id IN {marks}",
                   (BatchState.QUEUED.value, BatchState.DONE.value, *ids))
        # their audits are moot: the batches will be answered, and audited, again
        db.execute(f"UPDATE batches SET state=? WHERE state=? AND audit_of IN {marks}",
                   (BatchState.CANCELLED.value, BatchState.QUEUED.value, *ids))

    def audit_hosts(self) -> list[HostAudit]:
        """Per host: batches of it audited, disagreements (strikes), whether it is barred."""
        with self.store.read() as db:
            return host_audits(db)


def host_audits(db: sqlite3.Connection) -> list[HostAudit]:
    """Every host audited or barred (for `pcm status` and the metrics)."""
    rows = db.execute(
        "SELECT h.host, (SELECT COUNT(*) FROM audits a WHERE a.original_host=h.host AND a.agreed IS NOT NULL"
        " AND a.tiebreak_of IS NULL) AS audited, (SELECT COUNT(*) FROM strikes s WHERE s.host=h.host) AS disagreed,"
        " EXISTS (SELECT 1 FROM barred_hosts b WHERE b.host=h.host) AS barred"
        " FROM (SELECT original_host AS host FROM audits WHERE agreed IS NOT NULL UNION SELECT host FROM strikes"
        " UNION SELECT host FROM barred_hosts) h ORDER BY h.host").fetchall()
    return [HostAudit(host=r["host"], audited=r["audited"], disagreements=r["disagreed"],
                      barred=bool(r["barred"])) for r in rows]
