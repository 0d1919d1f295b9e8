"""Chat messages to a prompt, with the model's own template when it has one.

GGUF files carry their chat template (``tokenizer.chat_template``, Jinja2);
it is rendered in Jinja2's sandbox because the template comes from a file,
not from us.
"""
from __future__ import annotations

from collections.abc import Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A plain, model-agnostic fallback for files that carry no template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _raise(message: str):
    raise TemplateError(message)


def render(messages: Sequence[dict], template: str | None, bos_token: str = "", eos_token: str = "") -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    compiled = env.from_string(template or FALLBACK_TEMPLATE)
    return compiled.render(messages=list(messages), add_generation_prompt=True,
                           bos_token=bos_token, eos_token=eos_token)
