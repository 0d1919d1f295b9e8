"""A small Python client for the inferq HTTP API, streaming included."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import requests

from queue_schema.errors import ErrorCode, InferqError, StartError

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ApiError(InferqError):
    """The API answered an error: ``status``, and its ``code`` (an ErrorCode, or INTERNAL for one unknown here)."""

    def __init__(self, status: int, code: str, message: str):
        known = code in ErrorCode._value2member_map_
        super().__init__(ErrorCode(code) if known else ErrorCode.INTERNAL, message)
        self.status, self.api_code = status, code

    def __str__(self) -> str:
        return f"{self.api_code}: {self.message}"


class ApiUnreachable(StartError):
    """The API did not answer (not running, wrong address)."""


class Client:
    def __init__(self, base_url: str | None = None, token: str | None = None, timeout: float = 10.0):
        self.base_url = (base_url or os.environ.get("INFERQ_API_URL") or DEFAULT_API_URL).rstrip("/")
        if token is None:
            # The first entry of the API's own list; a "name:token" entry names a tenant.
            first = (os.environ.get("INFERQ_API_TOKENS") or "").split(",")[0].strip()
            token = (first.partition(":")[2] if ":" in first else first) or None
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            resp = self.session.request(method, self.base_url + path, timeout=kwargs.pop("timeout", self.timeout),
                                        **kwargs)
        except requests.ConnectionError:
            raise ApiUnreachable(f"cannot reach the inferq API at {self.base_url}") from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                code, message = err.get("code", str(resp.status_code)), err.get("message", "")
            except (ValueError, KeyError, TypeError):
                code, message = str(resp.status_code), resp.text[:200]
            raise ApiError(resp.status_code, code, message)
        return resp

    def submit(self, prompt: str | None = None, model: str = "demo", **fields) -> dict:
        body = {"operation": "infer", "model": model, **fields}
        if prompt is not None:
            body["prompt"] = prompt
        return self._request("POST", "/v1/jobs", json=body).json()

    def status(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["data"]

    def workers(self) -> list[dict]:
        return self._request("GET", "/v1/workers").json()["workers"]

    def narration(self, follow: bool = True, backlog: int = 20) -> Iterator[dict]:
        """The operators' narration feed (recent events, then live ones if ``follow``)."""
        params = {"follow": "true" if follow else "false", "backlog": backlog}
        with self._request("GET", "/v1/narration", params=params, stream=True,
                           timeout=(self.timeout, None)) as resp:
            for event in parse_sse(chunk_lines(resp.iter_content(chunk_size=None))):
                yield json.loads(event["data"])

    def text(self, job_id: str) -> str:
        """The job's generated text once it ended (``ApiError``-free: an ``error`` event gives what came before
        it). A ``started`` event naming another run than the one before means the job began again after its
        earlier take was lost: the text so far is dropped, as the log says it is void."""
        out, run = [], None
        for event in self.events(job_id):
            if event["type"] == "restart":  # read again from the start: what was read is void
                out.clear()
                run = None
            elif event["type"] == "started":
                if run is not None and event.get("run") != run:
                    out.clear()
                run = event.get("run")
            elif event["type"] == "token":
                out.append(event["t"])
        return "".join(out)

    def events(self, job_id: str, last_event_id: int | None = None, reconnects: int = 20) -> Iterator[dict]:
        """Yield the job's events until ``end``/``error``.

        A dropped stream, or an API that answers 503 while Redis is away, is
        retried with backoff and resumed with Last-Event-ID: no event is
        missed or repeated. A second ``started`` with another ``run`` means the
        job began again: the tokens before it are void (``text`` drops them).
        A ``restart`` (no seq) means the log lost events this client read (a
        Redis failover): it is yielded, and the log is read again from its
        start; drop what was read before it.
        """
        delay = 0.1
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
            try:
                with self._request("GET", f"/v1/jobs/{job_id}/stream", headers=headers, stream=True,
                                   timeout=(self.timeout, 60)) as resp:
                    for event in parse_sse(chunk_lines(resp.iter_content(chunk_size=None))):
                        data = json.loads(event["data"])
                        if data["type"] == "restart":
                            last_event_id = None
                            yield data
                            break
                        last_event_id = data["seq"]
                        delay = 0.1
                        yield data
                        if data["type"] in ("end", "error"):
                            return
                # Ended without a terminal event (the API process stopped, or Redis went away): resume.
                self._backoff_or_raise(ApiUnreachable(f"the stream of job {job_id} kept ending early"), reconnects)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, ApiUnreachable) as exc:
                self._backoff_or_raise(exc, reconnects)
            except ApiError as exc:
                if exc.status != 503:
                    raise
                self._backoff_or_raise(exc, reconnects)
            reconnects -= 1
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    @staticmethod
    def _backoff_or_raise(exc: Exception, reconnects: int) -> None:
        if reconnects <= 0:
            raise exc


def chunk_lines(chunks) -> Iterator[bytes]:
    """The lines (without their end of line) in a stream of byte chunks cut anywhere."""
    pending = b""
    for chunk in chunks:
        *complete, pending = (pending + chunk).split(b"\n")
        yield from (line.rstrip(b"\r") for line in complete)


def parse_sse(lines) -> Iterator[dict]:
    """SSE lines (bytes) to events: dicts with ``event``, ``id`` and ``data``."""
    event: dict = {}
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line:
            if data:
                yield {**event, "data": "\n".join(data)}
            event, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("event", "id", "retry"):
            event[name] = value
