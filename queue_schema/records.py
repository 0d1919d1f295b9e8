"""What workers publish about themselves and the models they serve (their heartbeat records).

Workers write these (queue_schema.lifecycle.registry); the API, admission and
rq-dashboard's neighbours read them.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    host: str
    pid: int
    model: str
    backend: str
    backend_reason: str = ""
    device: str = "cpu"
    state: str = "loading"  # loading | idle | busy | unhealthy | stopping
    slots: int = 1  # jobs it decodes at once
    jobs: list[str] = []  # the ids running now
    current_job: str | None = None  # the first of ``jobs`` (kept for older readers)
    batch_size: float = 0.0  # sequences per decode call, averaged over recent steps
    last_tokens_per_sec: float | None = None
    vram_bytes: int = 0
    context_length: int = 0
    capabilities: list[str] = []  # what its backend can do beyond plain generation (see ModelInfo)
    chat_template: str = "none"  # the template it renders chat with (see ModelInfo)
    chat_template_digest: str = "none"  # workers of one model must agree on it
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    log_format: int = 3  # the job log layout it writes (queue_schema.lifecycle.log_format.LOG_FORMAT)


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    context_length: int
    queue_depth: int  # the bound past which the API answers 503
    backend: str
    slots: int = 1  # jobs one of its workers decodes at once
    # What its workers can do beyond plain generation: chat_template (renders the file's template with
    # its control tokens), grammar (structured output), logprobs, embeddings. Admission refuses a job
    # that needs one the record lacks (UNSUPPORTED_FEATURE).
    capabilities: list[str] = []
    # The template chat messages are rendered with: "gguf" (the file's own), a built-in name (chatml, llama3,
    # gemma, mistral), "file:<name>", or "none" (the file has none: messages become plain "Role: text" lines).
    chat_template: str = "none"
    embedding_length: int = 0  # dimensions of its embeddings (0: it cannot embed)
    last_seen: float = 0.0
