"""Render a chat template as transformers' ``apply_chat_template`` does, in jinja2's sandbox.

Same environment as transformers (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, loop controls, a ``{% generation %}`` tag that just renders its body), the
same ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``), ``raise_exception`` and
``strftime_now``. Templates are untrusted code from model repositories: the sandbox refuses
attribute access to Python internals and mutation of the passed data.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import LlamaTrtError


class TokenizerError(LlamaTrtError):
    """A tokenizer file is missing, unreadable, or cannot do what was asked."""


def _environment():
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render_chat_template(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                         **kwargs) -> str:
    """``messages`` through ``template``; ``kwargs`` (bos_token, eos_token, tools, ...) are template variables."""
    from jinja2 import TemplateError

    try:
        return _environment().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as e:
        raise TokenizerError(f"chat template error: {e}") from None


__all__ = ["TokenizerError", "render_chat_template"]
