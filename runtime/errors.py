"""The one exception type for mistakes a user can fix; entries print its message without a traceback."""


class UserError(ValueError):
    """Bad configuration, input or environment. The message says what is wrong and names the fix."""
