"""The one user-error contract.

`UserError` is the base of every error caused by the user's input or environment (a bad path, an inconsistent
checkpoint, a full disk). Entry points print it as one line `error: ...` and exit 2, from whichever rank raised it.
Anything else is a programming error: it keeps its traceback and exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one line naming the file and the cause."""


EXIT_USER_ERROR = 2


class InputError(UserError, ValueError):
    """Invalid input that belongs to no narrower domain error (an argument, a data file)."""
