"""Chat-template rendering with the same Jinja semantics as transformers' ``apply_chat_template``.

The model's own template (GGUF metadata or tokenizer config) is used when it has one. Models
that ship none get a fallback keyed by architecture; anything else raises
:class:`~local_llm_kit.errors.TemplateError` rather than guessing a format the model was never
trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from local_llm_kit.errors import TemplateError

__all__ = ["FALLBACK_TEMPLATES", "ChatTemplate"]

# Gemma 3's published chat template, relaxed so that tool results (rendered as user turns by
# the tools layer) and consecutive turns of one role do not abort rendering.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = "user" -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

FALLBACK_TEMPLATES: dict[str, str] = {"gemma3": GEMMA3_TEMPLATE, "gemma3_text": GEMMA3_TEMPLATE}


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers overrides Jinja's tojson: no HTML escaping, unicode kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the model's chat template does not compile: {exc}") from exc


class ChatTemplate:
    """A compiled chat template and the special tokens it refers to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 is_fallback: bool = False) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.is_fallback = is_fallback
        self._template = _compile(source)
        # Template.render merges the template's globals (a ChainMap, walked in Python) into every
        # context; a request renders twice, so they are merged once here instead.
        self._globals = dict(self._template.globals)

    @classmethod
    def for_model(cls, template: str | None, architecture: str, *, bos_token: str = "",
                  eos_token: str = "") -> ChatTemplate:
        if template:
            return cls(template, bos_token=bos_token, eos_token=eos_token)
        fallback = FALLBACK_TEMPLATES.get(architecture)
        if fallback is None:
            raise TemplateError(
                f"the model (architecture {architecture!r}) ships no chat template and there is no "
                f"fallback for that architecture (known: {sorted(FALLBACK_TEMPLATES)}); use a model "
                "with a chat template in its GGUF metadata or tokenizer_config.json"
            )
        return cls(fallback, bos_token=bos_token, eos_token=eos_token, is_fallback=True)

    @property
    def renders_tools(self) -> bool:
        """Whether the template itself formats a ``tools`` list (HF tool-use templates)."""
        return "tools" in self.source

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        template = self._template
        context = template.new_context({
            **self._globals,
            "messages": list(messages),
            "tools": list(tools) if tools else None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
        }, shared=True)
        try:
            try:  # what Template.render does, with the globals merged already
                return template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined]
            except Exception:
                template.environment.handle_exception()
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"rendering the chat template failed: {exc}") from exc
