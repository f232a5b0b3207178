"""OpenAI API requests -> the Generator's prompt and sampling settings (`persimmon-serve`).

Parameters keep OpenAI's names and defaults (temperature 1, top_p 1, completions' max_tokens 16;
chat's max_tokens: the rest of the build's kv_capacity) and vLLM's extensions (top_k,
repetition_penalty, ignore_eos). A parameter this server cannot honour (n > 1, logprobs,
penalties, echo, ...) or does not know is refused with 400 naming it, as OpenAI does, rather
than ignored.
"""

from __future__ import annotations

import numbers

from .chat import format_chat
from .errors import PersimmonError
from .manifest import Manifest

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user",
          "top_k", "repetition_penalty", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias",
          "logprobs"}
FIELDS = {False: COMMON | {"prompt", "echo", "best_of", "suffix"},
          True: COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}
# accepted only at values that change nothing (or null)
NEUTRAL = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False, 0),
           "echo": (False,), "suffix": (), "top_logprobs": (0,), "logit_bias": ({},)}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# the Generator's finish reasons as OpenAI reports them ("stop": an end token or a stop string);
# a cancelled request has none (also what Triton's last response reports)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class RequestError(PersimmonError):
    """A request the server refuses: its HTTP status and the parameter at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (or a list of one string; token ids are not accepted)",
                           param="prompt")
    return prompt


def chat_prompt(body: dict, manifest: Manifest) -> str:
    """The conversation rendered with the build's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object with role and content", param="messages")
        turns.append({"role": message.get("role"), "content": _text(message.get("content"), index)})
    try:
        return format_chat(turns, manifest.tokenizer.chat_template)
    except PersimmonError as e:
        raise RequestError(str(e).removeprefix("format_chat: "), param="messages") from None


def _text(content, index: int):
    """A message's content: a string, or OpenAI's list of content parts if they are all text."""
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise RequestError(f"messages[{index}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                               f"are supported", param="messages")
        return "".join(part["text"] for part in content)
    return content


def sampling_settings(body: dict, chat: bool, generator, prompt: str) -> tuple[dict, bool, bool]:
    """(Generator sampling settings, stream?, include usage in the stream?) from the request body."""
    unknown = sorted(set(body) - FIELDS[chat])
    if unknown:
        raise RequestError(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    for name, allowed in NEUTRAL.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise RequestError(f"{name}={value!r} is not supported by this server", param=name)
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("stream_options is {\"include_usage\": bool}, with stream true", param="stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False)
    settings = {"temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
                "top_k": _typed(body, "top_k", int, 0), "repetition_penalty": _number(body, "repetition_penalty", 1.0),
                "ignore_eos": _typed(body, "ignore_eos", bool, False), "seed": _typed(body, "seed", int, None)}
    stop = body.get("stop")
    if stop is not None:
        settings["stop"] = stop if isinstance(stop, str) else _strings(stop)
    limit = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    if limit is None:
        limit = _rest_of_context(generator, prompt) if chat else COMPLETIONS_MAX_TOKENS
    elif type(limit) is not int:
        raise RequestError(f"{name} must be an integer, got {limit!r}", param=name)
    settings["max_new_tokens"] = limit
    return settings, stream, include_usage


def _rest_of_context(generator, prompt: str) -> int:
    capacity = generator.manifest.kv_capacity
    used = len(generator.tokenizer.encode(prompt))
    if used >= capacity:
        raise RequestError(f"the conversation is {used} tokens; this model's context (kv_capacity) is {capacity}",
                           param="messages")
    return capacity - used


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not kind:
        raise RequestError(f"{name} must be {'true or false' if kind is bool else 'an integer'}, got {value!r}",
                           param=name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise RequestError(f"{name} must be a number, got {value!r}", param=name)
    return value


def _strings(stop) -> list[str]:
    if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    return stop
