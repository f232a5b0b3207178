"""The one exception type users catch: every bad-input error in both packages derives from it."""


class PersimmonError(Exception):
    """Bad input (a file, a field, a value). The message names it and says what to do."""


def brief(value) -> str:
    """repr for an error line: a 10,000-entry list or a megabyte string must not become the message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
