"""Chat messages to a prompt, with the model's own template when it has one.

GGUF files carry their chat template (``tokenizer.chat_template``, Jinja2);
it is rendered as Hugging Face's ``apply_chat_template`` renders it (Jinja2's
sandbox, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``bos_token``/``eos_token``, ``add_generation_prompt``) because the template
comes from a file, not from us.

The rendered prompt is returned in parts: the template's own text, where the
control tokens it writes (``<|im_start|>``, ``<|eot_id|>``) are parsed as
single tokens, and each message's content, which is tokenized as plain text,
so a control token typed in a message stays text and cannot forge a turn. The
parts are found by rendering each content between two markers nobody can
guess (a fresh nonce per render) and cutting there; a template that changes
the content it writes (``| trim`` does) is matched by rendering the trimmed
content too. See ``worker.prompt`` for how the parts become tokens.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from queue_schema.errors import ConfigError

log = logging.getLogger(__name__)

# Templates for files that carry none (base models, conversions that dropped it), by family, as the families'
# own tokenizer_config.json files write them; `inferq worker --chat-template NAME` picks one.
BUILTIN_DIR = Path(__file__).with_name("templates")
BUILTIN_NAMES = ("chatml", "llama3", "gemma", "mistral")

# A plain, model-agnostic fallback for files that carry no template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, indent=None):  # Hugging Face's: no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


_ENV = _environment()


@dataclass(frozen=True)
class Rendered:
    """A rendered prompt as (text, from_template) parts, in order."""

    parts: tuple[tuple[str, bool], ...]
    exact: bool = True  # False: the template changed the content in a way the parts could not follow

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.parts)


def render_text(messages: Sequence[dict], template: str | None, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools: Sequence[dict] | None = None) -> str:
    """The prompt as one string, exactly as the template writes it."""
    extra = {"tools": [dict(t) for t in tools]} if tools else {}
    return _compiled(template or FALLBACK_TEMPLATE).render(messages=[dict(m) for m in messages],
                                                           add_generation_prompt=add_generation_prompt,
                                                           bos_token=bos_token, eos_token=eos_token, **extra)


# Kept for the callers that want the text only (the tests).
render = render_text


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """A worker renders one model's template for every chat job, up to three times each: compile it once."""
    return _ENV.from_string(template)


def render_parts(messages: Sequence[dict], template: str | None, bos_token: str = "", eos_token: str = "",
                 add_generation_prompt: bool = True, specials: Sequence[str] = (),
                 tools: Sequence[dict] | None = None) -> Rendered:
    """The prompt in parts: template text and message contents apart (see the module docstring).

    Raises jinja2's TemplateError when the template refuses the conversation
    (``raise_exception``: a system message a model does not take, roles out of order), or
    when it escapes the content so the parts cannot be told apart and a message holds
    one of ``specials`` (the control tokens' texts).
    """
    def draw(contents: list[str]) -> str:
        msgs = [{**m, "content": c} for m, c in zip(messages, contents)]
        return render_text(msgs, template, bos_token, eos_token, add_generation_prompt, tools)

    contents = [m.get("content") or "" for m in messages]
    exact = draw(contents)
    nonce = f"{secrets.randbelow(10 ** 16):016d}"  # digits: a template's upper() or lower() keeps them
    start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
    cut = re.compile(re.escape(start) + "(.*?)" + re.escape(end), re.S)
    marked = None
    for variant in (contents, [c.strip() for c in contents]):
        candidate = draw([start + c + end if c else c for c in variant])  # empty: nothing to keep apart
        if candidate.replace(start, "").replace(end, "") == exact:
            return Rendered(_split(candidate, cut))
        marked = marked or candidate
    if marked.count(start) == marked.count(end) == len(cut.findall(marked)) > 0:
        # The template rewrites content some other way: keep its structure, write the content as sent.
        log.info("the chat template changes message content beyond trimming; the content is written as sent")
        return Rendered(_split(marked, cut), exact=False)
    # The markers did not survive whole (the template cuts or rewrites content): all of it is template
    # text, which is safe only if no message holds a control token's text.
    typed = next((s for s in specials if s and any(s in c for c in contents)), None)
    if typed is not None:
        raise TemplateError(f"a message holds the control token {typed!r}, and this model's chat template "
                            "rewrites message content, so it cannot be kept as text; remove it")
    return Rendered(((exact, True),), exact=False)


def _split(marked: str, cut: re.Pattern) -> tuple[tuple[str, bool], ...]:
    parts, at = [], 0
    for m in cut.finditer(marked):
        if m.start() > at:
            parts.append((marked[at:m.start()], True))
        if m.group(1):
            parts.append((m.group(1), False))
        at = m.end()
    if at < len(marked):
        parts.append((marked[at:], True))
    return tuple(parts)


def builtin(name: str) -> str:
    return (BUILTIN_DIR / f"{name}.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class TemplateChoice:
    """The template a worker renders messages with, and where it came from: ``gguf`` (the file's own), a
    built-in name, ``file:<name>`` (a Jinja file), or ``none`` (no template: the plain fallback)."""

    name: str
    source: str | None

    @property
    def digest(self) -> str:
        """Workers of one model must render alike: they compare this."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16] if self.source else "none"


def choose(flag: str | None, in_file: str | None) -> TemplateChoice:
    """``--chat-template`` (a built-in name or a Jinja file) over the file's own template; ConfigError, naming
    the flag, for a name that is neither or a file that is no template."""
    if not flag:
        return TemplateChoice("gguf", in_file) if in_file else TemplateChoice("none", None)
    if flag in BUILTIN_NAMES:
        return TemplateChoice(flag, builtin(flag))
    path = Path(flag)
    if not path.is_file():
        raise ConfigError(f"--chat-template {flag}: neither a built-in template ({', '.join(BUILTIN_NAMES)}) "
                          f"nor a file")
    try:
        source = path.read_text(encoding="utf-8")
        _compiled(source)
    except (OSError, UnicodeDecodeError, TemplateError) as exc:
        raise ConfigError(f"--chat-template {flag}: not a readable Jinja template: {exc}") from None
    return TemplateChoice(f"file:{path.name}", source)


# --- tools ----------------------------------------------------------------------------------------
# Which call syntax a template teaches its model, by what the template writes (the same marks llama-server's
# parsers key on). A template that never mentions tools gets inferq's plain rendering, in Hermes's syntax.
TOOL_MARKS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3"),
              ("ipython", "llama3"))
PLAIN_TOOLS_INTRO = (
    "You can call functions. Their definitions, as JSON, are within <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with a JSON object of its name and arguments within <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n\n')


@dataclass(frozen=True)
class ToolSupport:
    """How a template takes tools: ``native`` (it renders ``tools``, assistant ``tool_calls`` and ``tool`` turns
    itself) or not (inferq writes them into the messages' text), and the call syntax to read back."""

    native: bool
    format: str


@functools.lru_cache(maxsize=16)
def tool_support(source: str | None) -> ToolSupport:
    """Asked for every chat job (its prompt and its ``started`` event) of a template that never changes."""
    if not source or "tools" not in source:
        return ToolSupport(False, "hermes")
    return ToolSupport(True, next((fmt for mark, fmt in TOOL_MARKS if mark in source), "hermes"))


def template_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as Hugging Face templates read them: a call's arguments as an object (the templates write
    them with ``tojson``), not the JSON text OpenAI sends."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call["function"])
                try:
                    args = json.loads(fn["arguments"])
                except ValueError:
                    args = None
                fn["arguments"] = args if isinstance(args, dict) else fn["arguments"]
                calls.append({**call, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def plain_tool_messages(messages: Sequence[dict], tools: Sequence[dict] | None) -> list[dict]:
    """The conversation for a template that knows no tools: the tools' definitions and the calls made go into
    the messages' text in Hermes's syntax, tool results become user turns, and turns of one role that end up
    side by side are joined (templates that insist on alternating roles would refuse them)."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            content += ("\n" if content else "") + \
                f'<tool_call>\n{{"name": {json.dumps(fn["name"])}, "arguments": {fn["arguments"]}}}\n</tool_call>'
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    if tools:
        intro = PLAIN_TOOLS_INTRO.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        out[0] = {**out[0], "content": intro + out[0]["content"]}
    return out
