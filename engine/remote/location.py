"""Where a remote lives: ``s3://BUCKET/PREFIX``, its endpoint and region, its name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import UsageError
from engine.validate import NAME_RE

SCHEME = "s3://"
# S3's bucket rule (lower case, digits, dots, hyphens; 3-63), which radosgw enforces too.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# A prefix: path segments of printable characters, none of them '.' or '..'.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~+=@,-]+")


def is_s3_url(text: str) -> bool:
    """Whether a command's REPO argument names a remote rather than a directory."""
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, rel: str) -> str:
        """The object key of ``rel`` (a path relative to the remote, e.g. ``catalog/...``)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str | None:
        """``key`` relative to the prefix, or None if it lies outside it."""
        if not self.prefix:
            return key
        head = self.prefix + "/"
        return key[len(head):] if key.startswith(head) else None


def parse_s3_url(text: str) -> S3Location:
    """``s3://BUCKET[/PREFIX]`` checked: a hostile or mistyped URL is refused in one line."""
    if not is_s3_url(text):
        raise UsageError(f"{text!r} is not an s3:// URL (s3://BUCKET/PREFIX)")
    bucket, _, prefix = text[len(SCHEME):].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise UsageError(f"{text!r}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, "
                         "'.' and '-')")
    prefix = prefix.strip("/")
    for seg in prefix.split("/") if prefix else []:
        if not _SEGMENT_RE.fullmatch(seg) or seg in (".", ".."):
            raise UsageError(f"{text!r}: the prefix segment {seg!r} is not allowed (letters, digits and "
                             "._~+=@,- ; no empty, '.' or '..' segments)")
    if len(prefix) > 512:
        raise UsageError(f"{text!r}: the prefix is longer than 512 characters")
    return S3Location(bucket, prefix)


def validate_remote_name(name: str) -> str:
    """A remote's name in the repository: the device-name rule."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid remote name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def validate_endpoint(url: str | None) -> str | None:
    """An endpoint URL: http(s)://HOST[:PORT][/PATH], one line, no credentials in it."""
    if url is None:
        return None
    if not re.fullmatch(r"https?://[^\s@/]+(/[^\s]*)?", url):
        raise UsageError(f"endpoint {url!r} is not an http:// or https:// URL (and holds no user:password@)")
    return url


@dataclass(frozen=True)
class RemoteSpec:
    """A remote as the repository records it (never its credentials)."""

    name: str
    url: str
    endpoint: str | None = None
    region: str | None = None

    @property
    def location(self) -> S3Location:
        return parse_s3_url(self.url)


def make_spec(name: str, url: str, endpoint: str | None = None, region: str | None = None) -> RemoteSpec:
    """A remote as `remote add` is given it, every part checked."""
    if region is not None and not re.fullmatch(r"[a-z0-9-]{1,64}", region):
        raise UsageError(f"region {region!r} is not an S3 region name (e.g. us-east-1)")
    parse_s3_url(url)
    return RemoteSpec(validate_remote_name(name), url.rstrip("/"), validate_endpoint(endpoint), region)
