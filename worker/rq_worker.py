"""The RQ worker that keeps one model loaded.

It subclasses ``SimpleWorker``: jobs run in this process, without a fork per
job, because a CUDA context does not survive fork and reloading a model per
job is far too slow.
"""
from __future__ import annotations

import logging

import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from queue_schema import jobs
from queue_schema.errors import InferqError
from worker import reaper
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class InferqWorker(SimpleWorker):
    def __init__(self, runtime: WorkerRuntime, connection: redis.Redis, **kwargs):
        """``connection`` is RQ's own client (see worker.main: its socket timeout must outlast BLPOP)."""
        self.runtime = runtime
        # A worker that reconnects after a Redis outage registers anew under a new name.
        super().__init__(jobs.model_queues(runtime.redis, runtime.spec.name),
                         name=reaper.rq_name(runtime.id, runtime.incarnation),
                         connection=connection, serializer=JSONSerializer,
                         exception_handlers=[self._log_failure], disable_default_exception_handler=True,
                         **kwargs)

    def execute_job(self, job, queue):
        self.runtime.set_state("busy", job.id)
        try:
            super().execute_job(job, queue)
        finally:
            if self.runtime.unhealthy:
                self._stop_requested = True  # leave the queue to healthy workers
            else:
                self.runtime.set_state("stopping" if self._stop_requested else "idle")

    def heartbeat(self, timeout=None, pipeline=None):
        # RQ writes its heartbeat as three separate commands, and calls it between
        # taking a job and running it: three round trips before the first token.
        # In one pipeline they are one.
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline)
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipe)
            pipe.execute()

    def request_stop(self, signum, frame):
        self.runtime.stop_requested = True
        super().request_stop(signum, frame)

    def _log_failure(self, job, exc_type, exc_value, tb) -> bool:
        # Expected failures (bad prompt, too long, cancelled) are INFO; surprises get a traceback.
        if isinstance(exc_value, InferqError):
            log.info("job %s on %s failed: %s %s", job.id, self.name, exc_value.code.value, exc_value.message)
        else:
            log.error("job %s on %s failed unexpectedly", job.id, self.name, exc_info=(exc_type, exc_value, tb))
        return False
