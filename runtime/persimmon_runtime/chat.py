"""Persimmon's chat prompt format: `human: {prompt}\n\nadept:`, turns joined by blank lines."""

from __future__ import annotations

from .errors import PersimmonError

_ROLES = {"human": "human", "user": "human", "adept": "adept", "assistant": "adept"}


def format_chat(messages) -> str:
    """Prompt text for a conversation, ending where the model answers.

    `messages` is one user prompt (str), or a list of turns: strings alternating human/adept
    starting with human, or dicts {"role": "human"|"user"|"adept"|"assistant", "content": str}.
    The last turn must be the human's.
    """
    if isinstance(messages, str):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise PersimmonError(f"format_chat: messages must be a str or a list of turns, got {type(messages).__name__}")
    if not messages:
        raise PersimmonError("format_chat: the conversation is empty; pass at least one human prompt")
    parts = []
    for index, message in enumerate(messages):
        expected = "human" if index % 2 == 0 else "adept"
        if isinstance(message, dict):
            given, content = message.get("role"), message.get("content")
            role = _ROLES.get(given) if isinstance(given, str) else None
            if role is None:
                raise PersimmonError(f"format_chat: turn {index} has role {given!r}; use one of {', '.join(_ROLES)}")
        else:
            role, content = expected, message
        if role != expected:
            raise PersimmonError(f"format_chat: turn {index} has role {role!r}; turns must alternate "
                                 f"human/adept starting with human")
        if not isinstance(content, str):
            raise PersimmonError(f"format_chat: turn {index} content must be a str, got {type(content).__name__}")
        parts.append(f"{role}: {content}")
    if len(messages) % 2 == 0:
        raise PersimmonError("format_chat: the last turn is adept's; end with a human prompt")
    return "\n\n".join(parts) + "\n\nadept:"
