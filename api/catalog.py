"""What is being served: models and workers."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api.extensions import resources
from queue_schema import jobs, registry

bp = Blueprint("catalog", __name__)


@bp.get("/v1/models")
def list_models():
    """Models with a live (or recently live) worker, in OpenAI's list shape plus inferq's fields."""
    r = resources().redis
    workers = registry.live_workers(r)
    data = []
    for m in sorted(registry.known_models(r), key=lambda m: m.name):
        data.append({
            "id": m.name, "object": "model", "created": int(m.last_seen), "owned_by": "inferq",
            "context_length": m.context_length, "backend": m.backend,
            "workers": sum(1 for w in workers if w.model == m.name),
            "queued": jobs.depth(r, m.name), "max_queue_depth": m.queue_depth,
        })
    return jsonify(object="list", data=data)


@bp.get("/v1/workers")
def list_workers():
    workers = registry.live_workers(resources().redis)
    return jsonify(workers=[w.model_dump() for w in sorted(workers, key=lambda w: w.id)])
