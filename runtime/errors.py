"""The one exception type for mistakes a user can fix (bad paths, flags, inputs)."""


class UserError(Exception):
    """A problem with the user's input. Its message is one line naming the problem and the fix.

    Command-line entry points print it without a traceback and exit with status 2.
    """
