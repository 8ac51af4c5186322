"""The one user-error contract, in one place.

`UserError` is the base of every error caused by the user's input or environment (a bad path, an inconsistent
checkpoint, a full disk). OS errors about the user's files or machine (missing, unreadable, full disk, read-only)
count as user errors too. Entry points print a user error as one line `error: ...` and exit EXIT_USER_ERROR (2),
from whichever rank raised it; anything else is a programming error: it keeps its traceback and exits EXIT_BUG (1).
`user_error_message` is the one rule that tells the two apart (cli/__main__, cli.dist_entry and model.agree use it).
"""

from __future__ import annotations

import errno

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it

# OS errors that describe the user's files or machine, not a bug: reported as one line.
USER_OS_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                            errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})


class UserError(Exception):
    """An error the user can fix; its message is one line naming the file and the cause."""


class InputError(UserError, ValueError):
    """Invalid input that belongs to no narrower domain error (an argument, a data file)."""


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a programming error."""
    if isinstance(e, UserError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.errno in USER_OS_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return None


def exit_code(e: BaseException) -> int:
    """EXIT_USER_ERROR for a user error, EXIT_BUG for anything else."""
    return EXIT_BUG if user_error_message(e) is None else EXIT_USER_ERROR
