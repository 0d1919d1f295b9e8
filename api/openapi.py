"""The OpenAPI document, built from the pydantic contract so it cannot drift."""
from __future__ import annotations

from flask import Blueprint, jsonify

from api.jobs import LIST_STATES
from queue_schema.events import event_json_schema
from queue_schema.operations import EmbedOperation, InferOperation, JobAccepted

bp = Blueprint("openapi", __name__)

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "constraint": {"type": "string"}, "message": {"type": "string"}}}}}}},
}
_JOB_ID = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_IDEMPOTENCY = [{"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]{0,253}[\\x21-\\x7e])?$"},
                 # HTTP drops a header value's outer spaces: a key that begins or ends with one arrives another.
                 "description": "The same key from the same tenant within 24 h answers with the first "
                                "request's job (the OpenAI routes: its jobs, one per choice)."}]


def _query(name: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _json(ref: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": "error", **_json("Error")} for s in statuses}


def _schemas() -> dict:
    schemas = {"Error": _ERROR}
    from api.batches import BatchRequest
    from api.openai.requests import ChatRequest, CompletionRequest, EmbeddingRequest
    from api.openai.responses import ResponseRequest

    for name, model in (("InferOperation", InferOperation), ("EmbedOperation", EmbedOperation),
                        ("JobAccepted", JobAccepted), ("CompletionRequest", CompletionRequest),
                        ("ChatRequest", ChatRequest), ("EmbeddingRequest", EmbeddingRequest),
                        ("BatchRequest", BatchRequest), ("ResponseRequest", ResponseRequest)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    events = event_json_schema()
    for name, sub in events.pop("$defs", {}).items():
        schemas[f"Event{name}"] = sub
    return schemas


def document() -> dict:
    operation = {"oneOf": [{"$ref": "#/components/schemas/InferOperation"},
                           {"$ref": "#/components/schemas/EmbedOperation"}],
                 "discriminator": {"propertyName": "operation"}}
    submit = {"requestBody": {"required": True, "content": {"application/json": {"schema": operation}}},
              "parameters": _IDEMPOTENCY,
              "responses": {"202": {"description": "accepted", **_json("JobAccepted")},
                            **_errors(400, 401, 404, 422, 429, 503)}}
    job_obj = {"description": "job state", "content": {"application/json": {"schema": {"type": "object"}}}}
    completion_body = {"required": True, **_json("CompletionRequest")}
    chat_body = {"required": True, **_json("ChatRequest")}
    embedding_body = {"required": True, **_json("EmbeddingRequest")}
    openai_responses = {"200": {"description": "completion (JSON, or SSE when stream is true)",
                                "content": {"application/json": {"schema": {"type": "object"}},
                                            "text/event-stream": {"schema": {"type": "string"}}}},
                        **{str(s): job_obj for s in (400, 401, 404, 422, 429, 500, 503)}}
    openai_call = {"description": "an OpenAI object", "content": {"application/json": {"schema": {"type": "object"}}}}
    openai_errors = {str(s): openai_call for s in (400, 401, 404, 409, 413, 415, 422, 503)}
    file_id = [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    response_id = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    response_answers = {**openai_responses, "200": {
        "description": "a Response (JSON, or SSE when stream is true)",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}}}}}
    batch_id = [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    upload = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch"]}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "inferq", "version": "0.1.0",
                 "description": "A job-queue worker pool for GGUF language models."},
        "paths": {
            "/v1/jobs": {"post": {"summary": "Submit an operation", **submit},
                         "get": {"summary": "The caller's jobs, newest first", "parameters": [
                             _query("state", {"enum": list(LIST_STATES)}), _query("model", {"type": "string"}),
                             _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                             _query("cursor", {"type": "string", "pattern": "^[0-9]{1,16}_.+$"}),
                             _query("tenant", {"type": "string"})],
                             "responses": {"200": job_obj, **_errors(401, 422, 503)}}},
            "/v1/inference": {"post": {"summary": "Deprecated alias of POST /v1/jobs", "deprecated": True,
                                       **submit}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "Job state, position, result and timings", "parameters": _JOB_ID,
                        "responses": {"200": job_obj, **_errors(401, 404, 503)}},
                "delete": {"summary": "Cancel a job", "parameters": _JOB_ID,
                           "responses": {"200": job_obj, "202": job_obj, **_errors(401, 404, 409, 503)}}},
            "/v1/jobs/{job_id}/stream": {"get": {
                "summary": "The job's events as Server-Sent Events (id = seq, event = type)",
                "parameters": _JOB_ID + [{"name": "Last-Event-ID", "in": "header", "required": False,
                                          "schema": {"type": "string"}}],
                "responses": {"200": {"description": "event stream",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(401, 404, 422, 503)}}},
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": job_obj, **_errors(401, 503)}}},
            "/v1/workers": {"get": {"summary": "Live workers", "responses": {"200": job_obj, **_errors(401, 503)}}},
            "/v1/completions": {"post": {"summary": "OpenAI-compatible completion (an infer job)",
                                         "requestBody": completion_body, "parameters": _IDEMPOTENCY,
                                         "responses": openai_responses}},
            "/v1/chat/completions": {"post": {"summary": "OpenAI-compatible chat completion (an infer job)",
                                              "requestBody": chat_body, "parameters": _IDEMPOTENCY,
                                              "responses": openai_responses}},
            "/v1/embeddings": {"post": {"summary": "OpenAI-compatible embeddings (an embed job)",
                                        "requestBody": embedding_body, "parameters": _IDEMPOTENCY,
                                        "responses": {"200": job_obj, **{str(s): job_obj for s in
                                                                         (400, 401, 404, 422, 429, 500, 503)}}}},
            "/v1/responses": {"post": {"summary": "OpenAI's Responses API: one infer job, stored for GET "
                                                  "(background, stream, previous_response_id)",
                                       "requestBody": {"required": True, **_json("ResponseRequest")},
                                       "parameters": _IDEMPOTENCY, "responses": response_answers}},
            "/v1/responses/{response_id}": {
                "get": {"summary": "A stored response; stream=true&starting_after=N streams it again from N+1",
                        "parameters": response_id + [
                            _query("stream", {"enum": ["true", "false"]}),
                            _query("starting_after", {"type": "integer", "minimum": -1})],
                        "responses": response_answers},
                "delete": {"summary": "Delete a stored response (its job cancelled if still running)",
                           "parameters": response_id, "responses": {"200": openai_call, **openai_errors}}},
            "/v1/responses/{response_id}/cancel": {"post": {
                "summary": "Cancel a background response", "parameters": response_id,
                "responses": {"200": openai_call, **openai_errors}}},
            "/v1/responses/{response_id}/input_items": {"get": {
                "summary": "The input items the model was given (the whole conversation)",
                "parameters": response_id + [_query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                                             _query("order", {"enum": ["asc", "desc"]}),
                                             _query("after", {"type": "string"})],
                "responses": {"200": openai_call, **openai_errors}}},
            "/v1/files": {"post": {"summary": "Upload a JSONL file of batch requests (OpenAI's Files API)",
                                   "requestBody": upload, "responses": {"200": openai_call, **openai_errors}},
                          "get": {"summary": "The caller's files", "responses": {"200": openai_call,
                                                                                   **openai_errors}}},
            "/v1/files/{file_id}": {
                "get": {"summary": "A file's metadata", "parameters": file_id,
                        "responses": {"200": openai_call, **openai_errors}},
                "delete": {"summary": "Delete a file", "parameters": file_id,
                           "responses": {"200": openai_call, **openai_errors}}},
            "/v1/files/{file_id}/content": {"get": {
                "summary": "A file's bytes", "parameters": file_id,
                "responses": {"200": {"description": "the file", "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    **openai_errors}}},
            "/v1/batches": {"post": {"summary": "Create a batch (OpenAI's Batch API)",
                                     "requestBody": {"required": True, **_json("BatchRequest")},
                                     "responses": {"200": openai_call, **openai_errors}},
                            "get": {"summary": "The caller's batches, newest first",
                                    "parameters": [_query("limit", {"type": "integer", "minimum": 1,
                                                                    "maximum": 100}),
                                                   _query("after", {"type": "string"})],
                                    "responses": {"200": openai_call, **openai_errors}}},
            "/v1/batches/{batch_id}": {"get": {"summary": "A batch", "parameters": batch_id,
                                               "responses": {"200": openai_call, **openai_errors}}},
            "/v1/batches/{batch_id}/cancel": {"post": {"summary": "Cancel a batch", "parameters": batch_id,
                                                       "responses": {"200": openai_call, **openai_errors}}},
            "/health": {"get": {"summary": "Process alive", "responses": {"200": job_obj}}},
            "/ready": {"get": {"summary": "Redis answers and a worker serves a model",
                               "responses": {"200": job_obj, "503": job_obj}}},
        },
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(document())
