"""EIO answers that a fault explains (a lapsed lease, a fenced device, a metadata stall, lost
buffered writes, a bad checksum): each is logged with the node, the file and the reason, and
counted by cause (`awsomefs_eio_total{cause}`).

Why here, at the binding: it is the one place every such error passes on its way to the
application, so no raising site can forget to report. An EIO alone tells an operator nothing; the
log line says which node, which file and why. A fault makes many requests fail at once, so each
(file, cause) is logged once per `REPEAT_S` (the count says how many were folded in), while the
metric counts every one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from awsomefsd.meta.errors import UNEXPLAINED, FsError

log = logging.getLogger(__name__)

REPEAT_S = 30.0
MAX_TRACKED = 4096


class EioReporter:
    def __init__(self, node: str, count: Callable[[str], None], *, repeat_s: float = REPEAT_S) -> None:
        self.node = node
        self.count = count
        self.repeat_s = repeat_s
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()  # -> (logged at, folded)
        self.reported = 0

    def __call__(self, op: str, target: str, exc: FsError) -> None:
        cause = exc.cause or UNEXPLAINED
        self.count(cause)
        self.reported += 1
        key = (target, cause)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.repeat_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        folded = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > MAX_TRACKED:
            self._last.popitem(last=False)
        more = f" ({folded} more since the last report)" if folded else ""
        log.warning("%s: EIO to %s on %s (%s): %s%s", self.node, op, target, cause, exc.args[1], more)


__all__ = ["EioReporter"]
