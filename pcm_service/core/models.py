"""Models served by name: a name → a model directory and its engine settings."""
from __future__ import annotations

import sqlite3
from typing import Callable

from pcm_service.core.errors import UnknownModel
from pcm_service.protocol import EngineSettings, NamedModel
from pcm_service.store import Store
from pcm_service.weights.replicas import ReplicaMap


def _named(r: sqlite3.Row) -> NamedModel:
    return NamedModel(name=r["name"], path=r["path"], created=r["added_at"],
                      engine=EngineSettings.model_validate_json(r["engine"]))


class Models:
    """Register, list and look up models by name."""

    def __init__(self, store: Store, clock: Callable[[], float], replicas: ReplicaMap) -> None:
        self.store, self.clock, self.replicas = store, clock, replicas

    def add_model(self, model: NamedModel) -> NamedModel:
        """Register (or replace) a named model; raises ModelUnavailable if the model policy
        refuses the directory, before anything is stored."""
        self.replicas.register_model(model.path)
        added = model.model_copy(update={"created": self.clock()})
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO named_models VALUES (?, ?, ?, ?)",
                       (added.name, added.path, added.engine.model_dump_json(), added.created))
        return added

    def list_models(self) -> list[NamedModel]:
        """Every named model, by name."""
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM named_models ORDER BY name").fetchall()
        return [_named(r) for r in rows]

    def named_model(self, name: str) -> NamedModel:
        """The model registered by that name; raises UnknownModel."""
        with self.store.read() as db:
            r = db.execute("SELECT * FROM named_models WHERE name=?", (name,)).fetchone()
        if r is None:
            raise UnknownModel(name)
        return _named(r)

    def has_model(self, name: str) -> bool:
        """Whether a model by that name is registered (an OpenAI batch file's check)."""
        try:
            self.named_model(name)
        except UnknownModel:
            return False
        return True
