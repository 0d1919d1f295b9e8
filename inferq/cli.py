"""The ``inferq`` command line."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from inferq import logs as log_setup
from inferq.client import ApiError, ApiUnreachable, Client

DATA_DIR = os.environ.get("INFERQ_DATA_DIR", ".inferq")


def _model_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter("expected NAME=PATH, for example --model tiny=models/tiny.gguf")
    return name, path


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj.get("api_url"))


def _fail(message: str):
    raise click.ClickException(message)


class _Group(click.Group):
    """Turns the errors every command can meet into one clear line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ApiUnreachable as exc:
            _fail(f"{exc} (is `inferq up` or `inferq api` running? set INFERQ_API_URL)")
        except ApiError as exc:
            _fail(f"API error {exc.status} {exc.api_code}: {exc.message}")


@click.group(cls=_Group)
@click.option("--api-url", envvar="INFERQ_API_URL", default=None, help="API base URL (env INFERQ_API_URL).")
@click.option("--log-level", envvar="INFERQ_LOG_LEVEL", default="INFO", show_default=True)
@click.pass_context
def main(ctx, api_url, log_level):
    """inferq: a job-queue worker pool for GGUF language models.

    \b
    inferq up                                # Redis + API + a demo worker
    inferq submit "def fib(n):" --model demo # stream a job to the terminal
    """
    log_setup.setup(log_level)
    ctx.obj = {"api_url": api_url}


def _demo_model() -> tuple[str, str]:
    from inferq import demo_model

    try:
        return demo_model.NAME, str(demo_model.path())
    except FileNotFoundError as exc:
        _fail(str(exc))


@main.command()
@click.option("--model", "models", multiple=True, type=_model_arg, help="NAME=PATH; repeat for more workers.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--gpu-layers", default=0, show_default=True)
@click.option("--threads", default=0, help="Threads per worker (0: share the cores).")
@click.option("--gpus", default=None, help="all, or GPU indexes like 0,1: one worker per GPU per model.")
@click.option("--redis-url", envvar="REDIS_URL", default=None,
              help="Use this Redis; unset: start an embedded redis-server (env REDIS_URL).")
@click.option("--stop-timeout", default=60.0, show_default=True,
              help="Seconds the API, then the workers, get to stop on Ctrl-C before they are killed.")
@click.option("--redis-maxmemory", default="1gb", show_default=True, envvar="INFERQ_REDIS_MAXMEMORY",
              help="The embedded Redis's memory bound (noeviction); the API refuses new work 10% before it.")
@click.option("--chat-template", default=None, metavar="NAME|PATH",
              help="Render chat with a built-in template (chatml, llama3, gemma, mistral) or a Jinja file, "
                   "over the file's own, in every worker; for files that carry none.")
def up(models, host, port, backend, gpu_layers, threads, gpus, redis_url, stop_timeout, redis_maxmemory,
       chat_template):
    """Run the whole stack on this machine until Ctrl-C.

    \b
    inferq up                                   # demo model
    inferq up --model llama=models/llama.gguf --port 9000
    """
    from inferq.stack import Stack, StackError, WorkerArgs

    models = list(models) or [_demo_model()]
    for name, path in models:
        _check_model_path(path)
    if chat_template:
        _check_chat_template(chat_template)
    share = threads or max(1, ((os.cpu_count() or 2) - 1) // len(models))
    devices = _gpu_devices(gpus) if gpus else ["cpu"]
    stack = Stack([WorkerArgs(n, p, backend, gpu_layers, share, device, chat_template)
                   for n, p in models for device in devices],
                  host, port, DATA_DIR, redis_url, stop_timeout=stop_timeout, redis_maxmemory=redis_maxmemory)

    def ready(stack):
        from inferq.embedded_redis import masked

        click.echo(f"inferq is up: API {stack.api_url}  models: {', '.join(n for n, _ in models)}  "
                   f"redis: {masked(stack.redis_url)}")
        click.echo(f"try: inferq submit \"def \" --model {models[0][0]}   (Ctrl-C to stop)")

    try:
        stack.run(on_ready=ready)
    except StackError as exc:
        _fail(str(exc))
    click.echo("inferq stopped", err=True)


@main.command()
@click.option("--model", "model", default=None, type=_model_arg, help="NAME=PATH (default: the demo model).")
@click.option("--port", default=8000, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.argument("prompt", default="def ")
def demo(model, port, max_tokens, prompt):
    """Start the stack, stream one job to the terminal, and stop.

    \b
    inferq demo "import "
    """
    from inferq.stack import Interrupted, Stack, StackError, WorkerArgs

    name, path = model or _demo_model()
    stack = Stack([WorkerArgs(name, path)], port=port, data_dir=DATA_DIR,
                  redis_url=os.environ.get("REDIS_URL"))
    result = {"code": 1}

    def stream_one(stack):
        click.echo(f"stack up at {stack.api_url}; streaming a job for model {name!r}:", err=True)
        result["code"] = _stream_job(Client(stack.api_url), prompt, name,
                                     dict(max_tokens=max_tokens, temperature=0.0), as_json=False,
                                     echo_prompt=True)
        raise Interrupted()  # one job is the whole demo

    try:
        stack.run(on_ready=stream_one)
    except StackError as exc:
        _fail(str(exc))
    sys.exit(result["code"])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="gunicorn processes (gevent).")
def api(host, port, workers):
    """Serve the HTTP API with gunicorn + gevent (reads REDIS_URL, INFERQ_API_TOKENS)."""
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "--config", "python:api.gunicorn_conf",
                               "--workers", str(workers), "--bind", f"{host}:{port}", "api.wsgi:app"])


def _gpu_devices(gpus: str) -> list[str]:
    from worker import gpu

    try:
        available = gpu.count()
    except gpu.GPUError as exc:
        _fail(str(exc))
    if gpus == "all":
        indexes = list(range(available))
    else:
        try:
            indexes = [int(i) for i in gpus.split(",")]
        except ValueError:
            _fail(f"--gpus must be all or indexes like 0,1, not {gpus!r}")
    missing = [i for i in indexes if i >= available]
    if missing or not indexes:
        _fail(f"GPU(s) {missing or gpus} not found: {available} visible on this host")
    return [f"cuda:{i}" for i in indexes]


def _check_model_path(path: str) -> None:
    from worker.backends import ModelLoadError, check_model_file

    try:
        check_model_file(path)
    except ModelLoadError as exc:
        _fail(f"{exc.code.value}: {exc.message}")


def _check_chat_template(flag: str) -> None:
    """A bad name or file fails here, in one line, before the stack starts (each worker would refuse it)."""
    from queue_schema.errors import ConfigError
    from worker import chat_template

    try:
        chat_template.choose(flag, None)
    except ConfigError as exc:
        _fail(str(exc))


@main.command()
@click.option("--model", "model", required=True, type=_model_arg, help="NAME=PATH of the GGUF file to serve.")
@click.option("--backend", default="auto", show_default=True, help="auto | ctransformers")
@click.option("--gpu-layers", default=0, show_default=True, help="Layers to offload to the GPU.")
@click.option("--threads", default=0, show_default=True, help="CPU threads (0: all cores but one).")
@click.option("--ctx-size", default=0, show_default=True, help="Context length per job (0: the model's, up to 4096).")
@click.option("--parallel", default=0, show_default=True,
              help="Jobs decoded together (0: 4 on CPU, 8 on a GPU; ctransformers: 1).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--queue-depth", default=1000, show_default=True, help="Queued jobs past which the API answers 503.")
@click.option("--burst", is_flag=True, help="Quit when the queues are empty.")
@click.option("--grammar-limit", default=1.0, show_default=True, envvar="INFERQ_GRAMMAR_LIMIT_S",
              help="Seconds one grammar sample may take; a slower grammar ends its job alone.")
@click.option("--stuck-step-limit", default=60.0, show_default=True, envvar="INFERQ_STUCK_STEP_S",
              help="Seconds a decode step may run before its jobs are handed on and the worker reports unhealthy.")
@click.option("--chat-template", default=None, metavar="NAME|PATH",
              help="Render chat with a built-in template (chatml, llama3, gemma, mistral) or a Jinja file, "
                   "over the file's own; for files that carry none.")
@click.option("--redis-url", envvar="REDIS_URL", default="redis://127.0.0.1:6379/0", show_default=True)
def worker(model, backend, gpu_layers, threads, ctx_size, parallel, device, queue_depth, burst, grammar_limit,
           stuck_step_limit, chat_template, redis_url):
    """Load one model and run its jobs until SIGTERM/Ctrl-C (the running job finishes first).

    \b
    inferq worker --model tiny=models/tiny.gguf --threads 2
    """
    from worker.backends import LoadOptions
    from worker.main import WorkerStartError, run_worker
    from worker.runtime import ModelSpec

    name, path = model
    _check_model_path(path)
    spec = ModelSpec(name, path, backend, LoadOptions(threads=threads, gpu_layers=gpu_layers, ctx_size=ctx_size,
                                                      parallel=parallel),
                     device, queue_depth, grammar_limit, stuck_step_limit, chat_template)
    progress = _LoadProgress(name, path)
    try:
        run_worker(redis_url, spec, burst=burst, on_loaded=progress.done)
    except WorkerStartError as exc:
        progress.done()
        _fail(str(exc))


class _LoadProgress:
    """A spinner with the file size and elapsed time while a model loads (on a terminal)."""

    def __init__(self, name: str, path: str):
        import threading

        self.label = f"loading {name} ({os.path.getsize(path) / 1e6:.1f} MB)"
        self.start = time.monotonic()
        self._done = threading.Event()
        if sys.stderr.isatty():
            threading.Thread(target=self._spin, daemon=True).start()

    def _spin(self):
        frames = "|/-\\"
        n = 0
        while not self._done.wait(0.1):
            n += 1
            click.echo(f"\r{frames[n % 4]} {self.label} {time.monotonic() - self.start:.1f} s", err=True, nl=False)

    def done(self, *_):
        if not self._done.is_set():
            self._done.set()
            if sys.stderr.isatty():
                click.echo(f"\r{self.label}: done in {time.monotonic() - self.start:.1f} s", err=True)


def _stream_job(client: Client, prompt: str, model: str, fields: dict, as_json: bool,
                echo_prompt: bool = False) -> int:
    accepted = client.submit(prompt, model=model, **fields)
    job_id = accepted["job_id"]
    if not as_json:
        click.echo(f"job {job_id}", err=True)
    start, first = time.monotonic(), None
    for event in client.events(job_id):
        if as_json:
            click.echo(json.dumps(event))
        elif event["type"] == "queued":
            eta = f", about {event['eta_s']:.0f} s" if event.get("eta_s") else ""
            click.echo(f"queued at position {event['position']}{eta}", err=True)
        elif event["type"] == "token":
            if first is None and echo_prompt:
                click.echo(prompt, nl=False)  # the continuation reads as one text
            first = first or time.monotonic()
            click.echo(event["t"], nl=False)
        elif event["type"] == "restart" and not as_json:
            click.echo(f"\n[{event['message']}]", err=True)
            first = None
        elif event["type"] == "started" and not as_json:
            if first is not None:  # a later take of the job: what was printed is void
                click.echo("\n[the job began again on another take; the text above is void]", err=True)
                first = None
            click.echo(f"started on {event['worker']} after {event['queue_wait_ms']} ms in the queue", err=True)
        elif event["type"] == "end":
            ttft = f"{(first - start) * 1000:.0f} ms" if first else "-"
            rate = event["tokens_out"] / (event["decode_time_ms"] / 1000) if event["decode_time_ms"] else 0.0
            click.echo("")
            click.echo(f"[{event['tokens_out']} tokens, {rate:.0f} tok/s, TTFT {ttft}, "
                       f"stopped on {event['stop_reason']}]", err=True)
        elif event["type"] == "error":
            click.echo(f"\nerror {event['code']}: {event['message']}", err=True)
            return 1
    return 0


@main.command()
@click.argument("prompt")
@click.option("--model", required=True, help="Model name a worker serves.")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--seed", default=-1, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print every event as a JSON line.")
@click.pass_context
def submit(ctx, prompt, model, max_tokens, temperature, seed, stop, priority, as_json):
    """Submit a prompt and stream the tokens to the terminal.

    \b
    inferq submit "def fib(n):" --model demo --max-tokens 64
    inferq submit "hello" --model demo --json
    """
    fields = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=list(stop), priority=priority)
    sys.exit(_stream_job(_client(ctx), prompt, model, fields, as_json))


@main.command()
@click.argument("job_id")
@click.pass_context
def status(ctx, job_id):
    """Show a job's state, position, result and timings as JSON."""
    click.echo(json.dumps(_client(ctx).status(job_id), indent=2))


@main.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx, job_id):
    """Cancel a queued or running job."""
    click.echo(json.dumps(_client(ctx).cancel(job_id)))


@main.command()
@click.pass_context
def models(ctx):
    """List the models live workers serve."""
    for m in _client(ctx).models():
        click.echo(f"{m['id']}\tworkers={m['workers']}\tqueued={m['queued']}\tcontext={m['context_length']}"
                   f"\tbackend={m['backend']}")


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new narration as it happens.")
@click.option("--backlog", default=20, show_default=True, help="How many recent events to show first.")
@click.pass_context
def logs(ctx, follow, backlog):
    """Print the narration feed: the story of every job and worker.

    \b
    inferq logs --follow
    """
    import datetime

    for event in _client(ctx).narration(follow=follow, backlog=backlog):
        when = datetime.datetime.fromtimestamp(event["ts"] / 1000).strftime("%H:%M:%S")
        job = f" job {event['job_id'][:8]}" if event.get("job_id") else ""
        click.echo(f"{when} {event['actor']}{job}: {event['human']}")


@main.command("make-test-model")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--shape", type=click.Choice(["tiny", "slow", "small"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
def make_test_model(path, shape, seed):
    """Write the tiny random-weight llama GGUF the tests use.

    \b
    inferq make-test-model models/tiny.gguf
    """
    from inferq.testmodel import make_llama_gguf

    out = make_llama_gguf(path, shape, seed=seed)
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
