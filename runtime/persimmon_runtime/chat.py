"""Persimmon's chat prompt format: `human: {prompt}\n\nadept:`, turns joined by blank lines.

The format is written once, as a Jinja chat template (`CHAT_TEMPLATE`, the form transformers,
vLLM and onnxruntime-genai read from a tokenizer's `chat_template`): builds carry it in their
manifest and in `tokenizer_config.json`, and `format_chat` renders a conversation with it, so
transformers' `apply_chat_template` on the same messages gives the same text. The adept format
has no system role: a system message, allowed first only, becomes a plain first paragraph.
"""

from __future__ import annotations

import functools

from .errors import PersimmonError

# roles by the names callers use (OpenAI's user/assistant/system, Adept's human/adept)
_ROLES = {"human": "human", "user": "human", "adept": "adept", "assistant": "adept", "system": "system"}
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('a system message must come first') }}{%- endif -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] in ['user', 'human'] -%}{{ 'human: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] in ['assistant', 'adept'] -%}{{ 'adept: ' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'adept:' }}{%- endif -%}"
)


def format_chat(messages, template: str | None = None) -> str:
    """Prompt text for a conversation, ending where the model answers.

    `messages` is one user prompt (str), or a list of turns: strings alternating human/adept
    starting with human, or dicts {"role": "human"|"user"|"adept"|"assistant", "content": str},
    optionally after one {"role": "system", ...}. The last turn must be the human's. `template`:
    a build's chat template (None: `CHAT_TEMPLATE`).
    """
    turns = _checked_turns(messages)
    return render_template(template or CHAT_TEMPLATE, turns)


def render_template(template: str, messages: list[dict]) -> str:
    """A chat template rendered as transformers renders it (a sandboxed Jinja environment,
    `raise_exception`, add_generation_prompt=True); a template error is one line."""
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=True)
    except PersimmonError:
        raise
    except Exception as e:  # jinja2's errors (a bad template, a sandbox refusal) are not ours
        raise PersimmonError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PersimmonError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None

    def raise_exception(message):
        raise PersimmonError(f"the chat template refuses this conversation: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


def _checked_turns(messages) -> list[dict]:
    """The conversation as [{"role", "content"}], checked turn by turn (one line per problem)."""
    if isinstance(messages, str):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise PersimmonError(f"format_chat: messages must be a str or a list of turns, got {type(messages).__name__}")
    turns, system = [], 0
    for index, message in enumerate(messages):
        expected = "human" if (index - system) % 2 == 0 else "adept"
        if isinstance(message, dict):
            given, content = message.get("role"), message.get("content")
            role = _ROLES.get(given) if isinstance(given, str) else None
            if role is None:
                raise PersimmonError(f"format_chat: turn {index} has role {given!r}; use one of {', '.join(_ROLES)}")
        else:
            given, role, content = expected, expected, message
        if role == "system" and index == 0:
            system = 1
        elif role != expected:
            raise PersimmonError(f"format_chat: turn {index} has role {given!r}; turns must alternate human/adept "
                                 f"starting with human, after at most one system message first")
        if not isinstance(content, str):
            raise PersimmonError(f"format_chat: turn {index} content must be a str, got {type(content).__name__}")
        turns.append({"role": given, "content": content})
    if not turns:
        raise PersimmonError("format_chat: the conversation is empty; pass at least one human prompt")
    if len(turns) == system:
        raise PersimmonError("format_chat: the conversation has no human turn; pass at least one human prompt")
    if (len(turns) - system) % 2 == 0:
        raise PersimmonError("format_chat: the last turn is adept's; end with a human prompt")
    return turns
