"""Names of the hidden siblings our writers create beside an output: `.NAME.tmp-HOST-PID` and `.NAME.old-HOST-PID`
(checkpoint/atomic.py), `.NAME.megatron_prune.lock` (checkpoint/lock.py). They must fit the file system's 255-byte
limit for every legal NAME: a NAME too long to leave room for the longest suffix is shortened to a prefix of itself
plus a hash of the whole name, so a sibling still shows whose it is, and two long names never share one.
"""

from __future__ import annotations

import hashlib

NAME_MAX = 255        # bytes in one path component (Linux, macOS)
SUFFIX_ROOM = 64      # "." + ".tmp-" + host (<= 40) + "-" + pid (<= 10 digits) = 57; ".megatron_prune.lock" = 20
_HASH = 16            # hex digits of sha256 kept


def sibling_stem(name: str) -> str:
    """`name` itself when its siblings fit; else its first bytes (whole characters), "~" and a hash of it."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) + SUFFIX_ROOM <= NAME_MAX:
        return name
    keep = raw[:NAME_MAX - SUFFIX_ROOM - 1 - _HASH].decode("utf-8", "ignore")
    return f"{keep}~{hashlib.sha256(raw).hexdigest()[:_HASH]}"
