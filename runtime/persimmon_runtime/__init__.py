"""Persimmon runtime: tokenizer and (later) generation over exported builds. Never imports torch."""

from .chat import format_chat
from .errors import PersimmonError
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["PersimmonError", "Tokenizer", "IncrementalDetokenizer", "format_chat"]
__version__ = "0.1.0"
