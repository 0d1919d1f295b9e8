"""The contract between inferq's API and its workers.

Operations (what clients submit), events (what workers emit), errors, Redis
key names and the event log. ``api`` and ``worker`` both import this package
and never each other.
"""
from queue_schema.errors import ErrorCode, InferqError
from queue_schema.events import Event, parse_event
from queue_schema.operations import EmbedOperation, InferOperation, Operation, parse_operation

__all__ = ["ErrorCode", "InferqError", "Event", "parse_event", "InferOperation", "EmbedOperation", "Operation",
           "parse_operation"]
