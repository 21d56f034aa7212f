"""The one exception type that means "the user must change something"; entry points print its
message as a single line and exit with code 2 instead of showing a traceback."""


class UserError(Exception):
    """A bad option, a missing file, an unreachable server: a one-line message naming the fix."""
