"""What is being served: models and workers."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api import auth
from api.extensions import resources
from queue_schema.lifecycle import registry
from queue_schema.lifecycle import views as jobs

bp = Blueprint("catalog", __name__)


@bp.get("/v1/models")
def list_models():
    """Models served now (``online``) or within the grace period (``offline``), in OpenAI's list
    shape plus inferq's fields; ``last_seen`` is the last heartbeat of a worker of the model, and
    ``capabilities`` what its workers can do (chat_template, grammar, logprobs, embeddings), and
    ``chat_template`` which template chat is rendered with (``gguf``, a built-in name, ``file:<name>``, or
    ``none``: plain ``Role: text`` lines)."""
    r = resources().redis
    data = []
    for s in registry.model_statuses(r):
        m = s.model
        data.append({
            "id": m.name, "object": "model", "created": int(m.last_seen), "owned_by": "inferq",
            "status": s.status, "last_seen": m.last_seen,
            "context_length": m.context_length, "backend": m.backend, "capabilities": m.capabilities,
            "chat_template": m.chat_template,
            "embedding_length": m.embedding_length,
            "workers": s.workers, "serving_workers": s.serving,
            "queued": jobs.depth(r, m.name), "max_queue_depth": m.queue_depth,
        })
    return jsonify(object="list", data=data)


@bp.get("/v1/workers")
def list_workers():
    """Live workers; of the jobs each runs, only the caller's own (admins: all)."""
    r = resources().redis
    workers = sorted(registry.live_workers(r), key=lambda w: w.id)
    mine = auth.visible_jobs(r, [j for w in workers for j in w.jobs])
    shown = []
    for w in workers:
        jobs_shown = [j for j in w.jobs if j in mine]
        shown.append({**w.model_dump(), "jobs": jobs_shown,
                      "current_job": w.current_job if w.current_job in mine else None})
    return jsonify(workers=shown)
