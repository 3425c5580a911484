"""The HTTP layer: ``app`` (create_app, lifecycle), ``worker_routes`` (pool token),
``user_routes`` (API token), ``auth`` (the token dependencies), ``errors`` (one error body,
documented statuses, 413, strict JSON, OPTIONS/405), ``changes`` (long-poll wake-ups)."""
from __future__ import annotations

from pcm_service.api.app import create_app, tune_gc_for_serving

__all__ = ["create_app", "tune_gc_for_serving"]
