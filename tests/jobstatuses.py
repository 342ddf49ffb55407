"""The job statuses the tree model reads, as the mount's job runner keeps
them: for tests that build the model without a mount."""

from __future__ import annotations

from backupfs.status import JobStatus


class Statuses:
    """The job statuses the tree reads the snapshot file from (the job runner's role)."""

    def __init__(self) -> None:
        self.by_device: dict[str, JobStatus] = {}

    def __call__(self, device: str) -> JobStatus:
        return self.by_device.setdefault(device, JobStatus())
