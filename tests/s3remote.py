"""A bucket on the test cluster's radosgw, and `backupfs` run with its credentials.

The credentials and endpoint go only into the environment of the commands a
test runs (``env``): pytest's own os.environ never holds them, so no other
test can reach the bucket by accident. ``client`` is a boto3 client with the
keys given explicitly, for what a test does through the S3 API itself
(look at objects, damage one, plant a lock).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cephcluster import CephCluster
from tests.commands import backupfs_cmd, cli, repo_with_a_full


@dataclass
class S3Remote:
    cluster: CephCluster
    bucket: str
    prefix: str
    client: Any

    @classmethod
    def make(cls, cluster: CephCluster) -> S3Remote:
        import boto3

        client = boto3.client("s3", endpoint_url=cluster.endpoint, aws_access_key_id=cluster.access_key,
                              aws_secret_access_key=cluster.secret_key, region_name="us-east-1")
        bucket = "t-" + secrets.token_hex(6)
        client.create_bucket(Bucket=bucket)
        return cls(cluster, bucket, "site/one", client)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def env(self, **changes: str) -> dict[str, str]:
        """The environment of a command that reaches the bucket (``changes`` override)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.cluster.access_key, AWS_SECRET_ACCESS_KEY=self.cluster.secret_key,
                   AWS_ENDPOINT_URL=self.cluster.endpoint, AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")  # no credential lookup off this machine
        env.update(changes)
        return env

    def cli(self, *args: str | os.PathLike[str], check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`backupfs ARGS` with the bucket's credentials; never a traceback."""
        proc = subprocess.run(backupfs_cmd() + [str(a) for a in args], capture_output=True, text=True,
                              env=env or self.env(), timeout=timeout)
        assert "Traceback" not in proc.stderr, proc.stderr
        if check and proc.returncode != 0:
            pytest.fail(f"backupfs {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}")
        return proc

    def keys(self) -> dict[str, int]:
        """Every object under the prefix (relative key -> size)."""
        out: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + "/"):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix) + 1:]] = int(obj["Size"])
        return out

    def download(self, directory: Path) -> Path:
        """Copy the prefix to a directory, as `aws s3 sync` does."""
        for rel in self.keys():
            target = directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, f"{self.prefix}/{rel}", str(target))
        return directory

    def remove(self) -> None:
        keys = [{"Key": f"{self.prefix}/{k}"} for k in self.keys()]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start:start + 1000]})
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        for up in uploads:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        self.client.delete_bucket(Bucket=self.bucket)


def pushed_full(tmp_path: Path, s3: S3Remote, device: str, size: int) -> tuple[Path, Path]:
    """A repository with ``device`` on a disk of ``size`` random bytes, one full
    backup, remote ``off`` = ``s3``, pushed: (its disk, the repository)."""
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(size))
    repo = repo_with_a_full(tmp_path / "repo", device, disk)
    cli("remote", "add", repo, "off", s3.url)
    s3.cli("push", repo, "off")
    return disk, repo


def kill_push_when(repo: Path, s3: S3Remote, sent: Callable[[dict[str, int]], bool]) -> None:
    """`backupfs push REPO off`, killed (-9) as soon as ``sent(s3.keys())`` holds,
    looked at as fast as listings come; fails if it ends first or sends nothing in 60 s."""
    proc = subprocess.Popen(backupfs_cmd() + ["push", str(repo), "off"], env=s3.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sent(s3.keys()):
            assert proc.poll() is None, "the push ended before it could be killed"
            assert time.monotonic() < deadline, "the push sent nothing of b in 60 s"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
