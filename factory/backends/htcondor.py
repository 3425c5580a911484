"""Glideins as HTCondor jobs, through the htcondor2 bindings (no condor_* programs needed).

Each glidein is one vanilla-universe job running ``worker_image/entry.sh``; a submit is one
cluster of ``count`` procs. Jobs carry ``PcmFactory``/``PcmService`` attributes so the
factory queries and removes exactly its own. The pool token travels as a transferred
input file: the job ad holds only its file name.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from factory.backends.base import BackendError, Glidein, GlideinBackend, GlideinState
from factory.config import FactoryConfig, HTCondorSettings

log = logging.getLogger("pcm.factory.htcondor")

def _states(job_status: Any) -> dict[int, GlideinState]:
    """htcondor2.JobStatus → what the factory cares about (the bindings are imported lazily)."""
    return {job_status.IDLE: GlideinState.IDLE, job_status.RUNNING: GlideinState.RUNNING,
            job_status.REMOVED: GlideinState.EXITED, job_status.COMPLETED: GlideinState.EXITED,
            job_status.HELD: GlideinState.HELD, job_status.TRANSFERRING_OUTPUT: GlideinState.RUNNING,
            job_status.SUSPENDED: GlideinState.RUNNING}


_PROJECTION = ["ClusterId", "ProcId", "JobStatus", "RemoteHost", "LastRemoteHost", "AssignedGPUs",
               "HoldReason", "HoldReasonCode", "RemoveReason", "ExitCode", "EnteredCurrentStatus", "JobRunCount"]


def condor_arguments(args: list[str]) -> str:
    """HTCondor's "new" arguments syntax: double-quoted, single quotes around words with spaces."""
    def one(a: str) -> str:
        a = a.replace("'", "''").replace('"', '""')
        return f"'{a}'" if (not a or any(c.isspace() for c in a)) else a
    return '"' + " ".join(one(a) for a in args) + '"'


def condor_environment(env: dict[str, str]) -> str:
    return condor_arguments([f"{k}={v}" for k, v in env.items()])


def glidein_description(s: HTCondorSettings, service_url: str, factory_name: str,
                        ca_file: Optional[str] = None) -> dict[str, str]:
    """The submit description of one glidein (a dict of HTCondor submit commands)."""
    from classad2 import quote

    log_dir = str(Path(s.log_dir).resolve())
    args = [service_url, "--glidein-id", "$(ClusterId).$(ProcId)"]
    d = {
        "universe": "vanilla",
        "executable": s.executable,
        "transfer_executable": str(s.transfer_executable).lower(),
        "initialdir": log_dir,
        "log": f"{log_dir}/glideins.log",
        "output": f"{log_dir}/glidein.$(ClusterId).$(ProcId).out",
        "error": f"{log_dir}/glidein.$(ClusterId).$(ProcId).err",
        "stream_output": "true",  # worker logs readable on the submit host while it runs
        "stream_error": "true",
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT",
        "kill_sig": "SIGTERM",  # the worker drains; HTCondor SIGKILLs after the vacate time
        "request_cpus": str(s.request_cpus),
        "request_memory": s.request_memory,
        "request_disk": s.request_disk,
        "MY.PcmFactory": quote(factory_name),
        "MY.PcmService": quote(service_url),
        "MY.PcmGlidein": "true",
    }
    inputs = []
    if s.token_file:
        inputs.append(s.token_file)
        args += ["--token-file", Path(s.token_file).name]  # a name in the sandbox, not the token
    if ca_file:  # what the worker trusts for an https:// service, transferred like the token
        inputs.append(ca_file)
        args += ["--ca-file", Path(ca_file).name]
    if s.environment.get("PCM_ENV") == "packed":
        inputs.append(s.bootstrap)
    if inputs:
        d["transfer_input_files"] = ",".join(inputs)
    if s.request_gpus:
        d["request_gpus"] = str(s.request_gpus)
        if s.gpus_minimum_memory:
            d["gpus_minimum_memory"] = str(s.gpus_minimum_memory)
        if s.gpus_minimum_capability:
            d["gpus_minimum_capability"] = str(s.gpus_minimum_capability)
    for key in ("requirements", "accounting_group", "accounting_group_user"):
        if getattr(s, key):
            d[key] = str(getattr(s, key))
    if s.environment:
        d["environment"] = condor_environment(s.environment)
    d["arguments"] = condor_arguments(args + s.worker_args)
    # "+Attr" is condor_submit's spelling; the bindings want "MY.Attr"
    d.update({f"MY.{k[1:]}" if k.startswith("+") else k: v for k, v in s.submit.items()})
    return d


class HTCondorBackend(GlideinBackend):
    name = "htcondor"

    def __init__(self, settings: HTCondorSettings, service_url: str, factory_name: str,
                 ca_file: Optional[str] = None) -> None:
        try:
            import classad2
            import htcondor2
        except ImportError:
            raise BackendError("the htcondor bindings are not installed: pip install 'pcm[htcondor]'") from None
        self.htcondor = htcondor2
        self._states = _states(htcondor2.JobStatus)
        self.settings = settings
        self.service_url = service_url
        self.factory_name = factory_name
        self.ca_file = ca_file
        self.constraint = (f"PcmFactory == {classad2.quote(factory_name)}"
                           f" && PcmService == {classad2.quote(service_url)}")
        self.schedd = self._locate()
        self._seen: dict[str, Glidein] = {}
        Path(settings.log_dir).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, config: FactoryConfig) -> "HTCondorBackend":
        return cls(config.htcondor, config.service, config.name, config.ca_file)

    # ----- schedd -----------------------------------------------------------------
    def _locate(self) -> Any:
        h, s = self.htcondor, self.settings
        where = f"schedd {s.schedd!r}" if s.schedd else "the local schedd"
        if s.collector:
            where += f" via collector {s.collector}"
        try:
            coll = h.Collector(s.collector) if s.collector else h.Collector()
            ad = coll.locate(h.DaemonType.Schedd, s.schedd) if s.schedd else coll.locate(h.DaemonType.Schedd)
            schedd = h.Schedd(ad)
            schedd.query(constraint="false", projection=["ClusterId"], limit=1)  # reachable, authorized
        except (h.HTCondorException, ValueError, RuntimeError) as e:
            raise BackendError(
                f"cannot reach {where}: {str(e).strip() or type(e).__name__}. Check htcondor.collector /"
                " htcondor.schedd in the factory config, that the pool is up, and that this user can"
                " authenticate (CONDOR_CONFIG, _CONDOR_SEC_* settings, an IDTOKEN).") from None
        return schedd

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self.htcondor.HTCondorException as e:
            raise BackendError(f"schedd {what} failed: {e}") from None

    def description(self) -> dict[str, str]:
        return glidein_description(self.settings, self.service_url, self.factory_name, self.ca_file)

    # ----- the backend interface --------------------------------------------------
    def submit(self, count: int) -> list[str]:
        sub = self.htcondor.Submit(self.description())
        res = self._call("submit", self.schedd.submit, sub, count=count)
        ids = [f"{res.cluster()}.{p}" for p in range(res.first_proc(), res.first_proc() + res.num_procs())]
        self._call("reschedule", self.schedd.reschedule)  # ask for a negotiation cycle now
        return ids

    def _glidein(self, ad: Any, gone: bool = False) -> Glidein:
        gid = f"{ad['ClusterId']}.{ad['ProcId']}"
        status = int(ad.get("JobStatus", 0))
        state = GlideinState.EXITED if gone else self._states.get(status, GlideinState.IDLE)
        if status == 5:
            detail = f"held (HoldReasonCode {ad.get('HoldReasonCode', '?')}): {ad.get('HoldReason') or '-'}"
        elif status == 3:
            detail = f"removed: {ad.get('RemoveReason') or '?'}"
        elif status == 4:
            detail = f"completed, exit code {ad.get('ExitCode', '?')}"
        else:
            detail = f"run {ad.get('JobRunCount', 0)}"
        host = ad.get("RemoteHost") or ad.get("LastRemoteHost")
        gpus = [g for g in str(ad.get("AssignedGPUs", "")).split(",") if g]
        return Glidein(glidein_id=gid, state=state, host=host, gpus=gpus, detail=detail,
                       since=float(ad.get("EnteredCurrentStatus", 0)) or None)

    def glideins(self) -> list[Glidein]:
        ads = self._call("query", self.schedd.query, constraint=self.constraint, projection=_PROJECTION)
        now = {g.glidein_id: g for g in (self._glidein(ad) for ad in ads)}
        out = list(now.values())
        left = [gid for gid in self._seen if gid not in now]
        if left:
            out += self._left_queue(left)
        self._seen = {gid: g for gid, g in now.items() if g.state != GlideinState.EXITED}
        return out

    def _left_queue(self, ids: list[str]) -> list[Glidein]:
        """Glideins that left the queue since the last look: why, from the schedd's history."""
        cond = " || ".join(f"(ClusterId == {c} && ProcId == {p})"
                           for c, p in (gid.split(".") for gid in ids))
        try:
            ads = self.schedd.history(f"({cond})", projection=_PROJECTION, match=len(ids))
        except self.htcondor.HTCondorException:
            ads = []
        found = {f"{a['ClusterId']}.{a['ProcId']}": self._glidein(a, gone=True) for a in ads}
        return [found.get(gid) or self._seen[gid].model_copy(
                    update={"state": GlideinState.EXITED, "detail": "left the queue", "since": time.time()})
                for gid in ids]

    def remove(self, glidein_ids: list[str], reason: str = "PCM factory: scale down") -> None:
        if glidein_ids:
            self._call("remove", self.schedd.act, self.htcondor.JobAction.Remove, list(glidein_ids),
                       reason=reason)

    def evict(self, glidein_id: str, hard: bool) -> None:
        """A vacate, as an owner or a higher-priority job would cause: the glidein goes back to
        the queue. ``hard``: VacateFast (SIGKILL, no vacate time)."""
        action = self.htcondor.JobAction.VacateFast if hard else self.htcondor.JobAction.Vacate
        self._call("vacate", self.schedd.act, action, [glidein_id], reason="PCM eviction drill")

    def configure(self, config: FactoryConfig) -> None:
        old, self.settings = self.settings, config.htcondor
        self.ca_file = config.ca_file or self.ca_file
        Path(self.settings.log_dir).mkdir(parents=True, exist_ok=True)
        if (old.collector, old.schedd) != (self.settings.collector, self.settings.schedd):
            self.schedd = self._locate()

    def close(self) -> None:
        """Glideins outlive the factory: a restarted factory finds them by their tags."""

