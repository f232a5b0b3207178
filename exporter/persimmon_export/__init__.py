"""Persimmon exporter: reference model, config, checkpoints, conversion (needs torch)."""

from .config import ConfigError, PersimmonConfig
from .model import (PersimmonForCausalLM, PersimmonForSequenceClassification,
                    PersimmonForTokenClassification, PersimmonModel)

__all__ = ["PersimmonConfig", "ConfigError", "PersimmonModel", "PersimmonForCausalLM",
           "PersimmonForSequenceClassification", "PersimmonForTokenClassification"]
__version__ = "0.1.0"
