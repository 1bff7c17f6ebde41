"""The one exception type for mistakes a person can fix: its message says what was wrong, where, and what to do."""


class UserError(Exception):
    """A bad input (file, folder, field or value); the CLI prints it without a traceback, the UI shows it."""
