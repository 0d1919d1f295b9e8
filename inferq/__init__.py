"""inferq: a job-queue worker pool for GGUF language models (CLI, client, embedded stack)."""
__version__ = "0.1.0"
