"""The one exception type for mistakes a user can fix (bad paths, flags, inputs)."""


class UserError(Exception):
    """A problem with the user's input. Its message is one line naming the problem and the fix.

    Command-line entry points print it without a traceback and exit with status 2.
    """


def run_command(work) -> int:
    """A command line's exit status: 0 when `work()` returns, 2 with one `error: ...` line for a UserError."""
    import sys

    try:
        work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
