"""The one exception type users catch: every bad-input error in both packages derives from it."""


class PersimmonError(Exception):
    """Bad input (a file, a field, a value). The message names it and says what to do."""
