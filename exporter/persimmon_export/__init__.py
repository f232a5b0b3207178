"""Persimmon exporter: reference model, config, checkpoints, conversion, builds (needs torch:
pip install '.[export]'). `doctor` and `triton` run without it, so the model
classes are imported on first use, not with the package."""

__version__ = "0.1.0"
_LAZY = {"PersimmonConfig": "config", "ConfigError": "config", "PersimmonModel": "reference.model",
         "PersimmonForCausalLM": "reference.model", "PersimmonForSequenceClassification": "reference.model",
         "PersimmonForTokenClassification": "reference.model"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
