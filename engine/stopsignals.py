"""The signals whose handlers stop a command by raising (Ctrl-C, and the
CLI's SIGTERM and SIGHUP, backupfs/cli.py).

A handler's exception can land between any two Python statements, so code
that creates something only a ``try`` can undo holds these back from just
before the creation until inside that ``try`` (restore's temporary file, a
backup's registered job): a stop arriving in between is raised there.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
