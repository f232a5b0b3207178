"""Persimmon runtime: tokenizer and (later) generation over exported builds. Never imports torch."""

from .chat import format_chat
from .classifier import Classification, Classifier, TokenLabel
from .errors import PersimmonError
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["PersimmonError", "Tokenizer", "IncrementalDetokenizer", "format_chat", "Classifier", "Classification",
           "TokenLabel"]
__version__ = "0.1.0"
