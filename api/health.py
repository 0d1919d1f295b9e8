"""Liveness and readiness."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api.extensions import resources
from queue_schema.lifecycle import registry

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    """The process is alive (no dependency checked)."""
    return jsonify(status="ok")


@bp.get("/ready")
def ready():
    """200 when Redis answers and at least one live worker serves a model."""
    try:
        r = resources().redis
        r.ping()
        serving = [w for w in registry.live_workers(r) if w.state in ("idle", "busy")]
    except Exception as exc:  # any Redis failure means "not ready", never a 500
        return jsonify(status="unavailable", reason=f"redis: {exc.__class__.__name__}"), 503
    if not serving:
        return jsonify(status="unavailable", reason="no live worker serves a model"), 503
    return jsonify(status="ready", workers=len(serving), models=sorted({w.model for w in serving}))
