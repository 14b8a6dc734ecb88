"""The one exception type that reaches the user as a message instead of a traceback."""


class TlexpError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do."""


class RunDirRefused(TlexpError):
    """A run dir that holds another run (or a running one): refused before anything in it changes."""


class RunDirBusy(RunDirRefused):
    """Another process runs in the run dir: nothing there is this one's to write, not even a failed record."""
