"""Another local user, for the tests of what other users can and cannot do."""

from __future__ import annotations

import os
import subprocess


class OtherUser:
    """An unprivileged local user made for the test session: the hostile or
    merely curious neighbour that the repository must keep out."""

    def __init__(self, name: str) -> None:
        import pwd

        entry = pwd.getpwnam(name)
        self.name = name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid

    def run(self, *cmd: str | os.PathLike[str], check: bool = False, timeout: float = 60,
            **kwargs: object) -> subprocess.CompletedProcess:
        """Run a command as this user (no supplementary groups), output captured as text."""
        return subprocess.run([str(c) for c in cmd], user=self.uid, group=self.gid, extra_groups=[],
                              capture_output=True, text=True, check=check, timeout=timeout,
                              **kwargs)  # type: ignore[call-overload]
