"""The human story of a job and a worker, as narration event fields."""
from __future__ import annotations


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def model_loaded(worker: str, model: str, size: int, backend: str, device: str, ctx: int, seconds: float) -> dict:
    return dict(actor=worker, action="load", target=model,
                human=f"Loaded model {model} ({_mb(size)}, context {ctx}) on {device} with {backend} "
                      f"in {seconds:.2f} s",
                cute=f"{model} is warmed up and ready to write")


def job_started(worker: str, job_id: str, model: str, wait_ms: int, prompt_tokens: int) -> dict:
    return dict(actor=worker, action="start", target=job_id,
                human=f"Worker {worker} picked up the job after {wait_ms} ms in the queue; "
                      f"prompt is {prompt_tokens} tokens for {model}")


def job_finished(worker: str, job_id: str, tokens: int, seconds: float, tok_s: float, reason: str) -> dict:
    return dict(actor=worker, action="finish", target=job_id,
                human=f"Generated {tokens} tokens in {seconds:.2f} s ({tok_s:.0f} tok/s); stopped on {reason}",
                story="cancelled by the client" if reason == "cancelled" else None)


def job_failed(worker: str, job_id: str, code: str, message: str) -> dict:
    return dict(actor=worker, action="fail", target=job_id, human=f"Job failed with {code}: {message}")


def embed_finished(worker: str, job_id: str, inputs: int, tokens: int, seconds: float, reason: str) -> dict:
    return dict(actor=worker, action="finish", target=job_id,
                human=f"Embedded {inputs} inputs ({tokens} tokens) in {seconds:.2f} s; stopped on {reason}",
                story="cancelled by the client" if reason == "cancelled" else None)
