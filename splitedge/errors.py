"""The one user-facing error type: its message says what to do next."""


class SplitedgeError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
