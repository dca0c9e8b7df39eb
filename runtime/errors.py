"""The one exception type for mistakes a user can fix; entries print its message without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad configuration, input or environment. The message says what is wrong and names the fix."""


@contextmanager
def exit_on_user_error(log: logging.Logger) -> Iterator[None]:
    """In an entry point: a UserError becomes one `error: ...` line and exit code 2."""
    try:
        yield
    except UserError as e:
        log.error("error: %s", e)
        sys.exit(2)
