"""What the service keeps for factories: their limits and their last reports.

Limits live in the service (not in a factory) so `pcm factory set` works without
reaching the factory, takes effect at its next cycle and survives restarts of both.
"""
from __future__ import annotations

from typing import Optional

from pcm_service.protocol import FactoryLimits, FactoryReport, FactoryView, Glidein
from pcm_service.store import Store

REPORT_TTL = 300.0  # a factory silent for this long no longer shows glideins


class FactoryRegistry:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _get(self, key: str) -> Optional[str]:
        with self.store.read() as db:
            row = db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None

    def limits(self) -> FactoryLimits:
        return self.explicit_limits() or FactoryLimits()

    def explicit_limits(self) -> Optional[FactoryLimits]:
        """The limits someone set (a factory, `pcm factory set`, `pcm run`); None if never set."""
        raw = self._get("factory_limits")
        return FactoryLimits.model_validate_json(raw) if raw else None

    def set_limits(self, limits: FactoryLimits, from_config: bool = False) -> FactoryLimits:
        """``from_config``: a factory applies its config file's limits; remembered so that a
        factory restart with the same file does not undo a later `pcm factory set`."""
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('factory_limits', ?)",
                       (limits.model_dump_json(),))
            if from_config:
                db.execute("INSERT OR REPLACE INTO settings VALUES ('factory_config_limits', ?)",
                           (limits.model_dump_json(),))
        return limits

    def report(self, rep: FactoryReport) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                       (f"factory_report:{rep.factory}", rep.model_dump_json()))

    def reports(self, now: float) -> list[FactoryReport]:
        with self.store.read() as db:
            rows = db.execute("SELECT value FROM settings WHERE key LIKE 'factory_report:%'"
                              " ORDER BY key").fetchall()
        reps = [FactoryReport.model_validate_json(r["value"]) for r in rows]
        return [r for r in reps if now - r.at < REPORT_TTL]

    def glideins(self, now: float) -> list[Glidein]:
        return [g for rep in self.reports(now) for g in rep.glideins]

    def view(self, now: float) -> FactoryView:
        raw = self._get("factory_config_limits")
        return FactoryView(limits=self.limits(), reports=self.reports(now),
                           config_limits=FactoryLimits.model_validate_json(raw) if raw else None)
