"""The one exception type that reaches the user as a message instead of a traceback."""


class TlexpError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do."""
