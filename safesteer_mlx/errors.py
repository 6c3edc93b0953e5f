"""The one project exception: a problem a user can act on."""


class SafeSteerError(Exception):
    """Bad input or an unmet precondition. The message names the problem and the fix;
    the CLI prints it as one line and exits with code 2."""
