"""The one error type users see: a message that says what is wrong and what to do."""


class EdgekitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
