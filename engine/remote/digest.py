"""The checksum a remote's catalog records for each object: the S3 ETag of our upload.

An upload is checked against what the server received, and the only digest
that radosgw (Ceph 16) and S3 both compute over the received bytes of every
upload is the ETag: the MD5 of a single PUT's body, or, for a multipart
upload, the MD5 of its parts' MD5s followed by ``-N`` (N parts). So the
catalog records that value and the part size it was made with, and a push
hashes each byte once. Recording a sha256 as well cost 0.29 CPU-seconds per
256 MiB pushed, on top of the MD5 the check needs: a quarter of the push's
own CPU, on a machine whose radosgw needs the other core. Readers check a
downloaded object the same way, part by part, as it streams.

What this guards against is damage (a flipped bit, a truncated or replaced
object), not someone who can write the bucket: the catalog lives there too
(README says so). Snapshots that earlier versions wrote record a sha256
instead; their objects are still checked by it.

Where a sha256 would not be fooled and this is: MD5 collisions are cheap to
make (chosen-prefix ones included), so whoever can write the bucket can
put there an image that differs from what was pushed and has the recorded
ETag -- but that writer can as well rewrite the catalog naming any bytes,
so neither hash stops them; only a catalog kept out of their reach (a copy
elsewhere, an object lock) would make the sha256 the stronger. Against
damage, MD5 catches what sha256 catches. A server whose ETag is not an MD5
(AWS S3 with SSE-KMS or SSE-C encryption; a bucket-to-bucket copy made
with another part size changes a multipart ETag too) fails the check after
upload: such a push is refused, in one line, not recorded wrong.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

ETAG_RE = re.compile(r"[0-9a-f]{32}(?:-([1-9][0-9]{0,4}))?")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MIN_PART = 1 << 20  # a recorded part size below this is not one a push uses
MAX_PART = 5 << 30  # S3's own limit


@dataclass(frozen=True)
class Checksum:
    """``etag`` with ``part_size`` (0: one PUT), or ``sha256`` (snapshots of earlier versions)."""

    etag: str = ""
    part_size: int = 0
    sha256: str = ""

    def fields(self) -> dict[str, Any]:
        """What a catalog snapshot records, beside an object's key and size."""
        if self.sha256:
            return {"sha256": self.sha256}
        return {"etag": self.etag, "part_size": self.part_size}

    @property
    def text(self) -> str:
        """One string naming these bytes (cache file names are made from it)."""
        return self.sha256 or f"{self.etag}.{self.part_size}"

    def digest(self) -> StreamDigest:
        """A running digest of bytes read back, to compare with this one."""
        return StreamDigest(None if self.sha256 else self.part_size)

    def matches(self, digest: StreamDigest) -> bool:
        return digest.hexdigest() == (self.sha256 or self.etag)


class StreamDigest:
    """The ETag (or, given None, the sha256) of bytes fed in any pieces."""

    def __init__(self, part_size: int | None) -> None:
        self.part_size = part_size
        self._hash = hashlib.sha256() if part_size is None else hashlib.md5()
        self._in_part = 0
        self._parts: list[bytes] = []

    def update(self, data: bytes | memoryview) -> None:
        if not self.part_size:  # sha256, or one PUT's MD5
            self._hash.update(data)
            return
        view = memoryview(data)
        while view:
            take = min(len(view), self.part_size - self._in_part)
            self._hash.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == self.part_size:
                self._parts.append(self._hash.digest())
                self._hash = hashlib.md5()
                self._in_part = 0

    def hexdigest(self) -> str:
        if not self.part_size:
            return self._hash.hexdigest()
        parts = self._parts + ([self._hash.digest()] if self._in_part else [])
        return multipart_etag(parts)


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload of parts with these MD5 digests."""
    return hashlib.md5(b"".join(part_md5s)).hexdigest() + f"-{len(part_md5s)}"


def decode_checksum(doc: dict[str, Any], size: int) -> Checksum:
    """An object entry's checksum, checked against its size; ValueError says what is wrong."""
    if "etag" not in doc and isinstance(doc.get("sha256"), str) and SHA256_RE.fullmatch(doc["sha256"]):
        return Checksum(sha256=doc["sha256"])
    etag, part = doc.get("etag"), doc.get("part_size")
    m = ETAG_RE.fullmatch(etag) if isinstance(etag, str) else None
    if m is None:
        raise ValueError(f"etag {etag!r} is not an S3 ETag (32 hex digits, then -N for N parts)")
    if not isinstance(part, int) or isinstance(part, bool):
        raise ValueError(f"part_size {part!r} is not a number")
    if m.group(1) is None:
        if part != 0:
            raise ValueError(f"part_size {part} given for a single upload's etag")
    else:
        if not MIN_PART <= part <= MAX_PART:
            raise ValueError(f"part_size {part} is not from {MIN_PART} to {MAX_PART}")
        if int(m.group(1)) != -(-size // part):
            raise ValueError(f"etag {etag} counts {m.group(1)} parts, {size} bytes in parts of {part} make "
                             f"{-(-size // part)}")
    return Checksum(etag=etag, part_size=part)
