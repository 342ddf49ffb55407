"""The S3 bucket a remote lives in: bounded time, one-line errors, objects written once.

Every call goes through ``RemoteStore``, which turns what botocore raises
(no credentials, refused keys, no such bucket, an endpoint that does not
answer) into a ``RemoteError`` naming the remote: one line, never a
traceback, never a credential. Time is bounded by the client's connect and
read timeouts and a small number of retries.

Objects are created, never replaced: a single PUT carries
``If-None-Match: *`` (a second PUT of the key gets 412). radosgw 16 ignores
that header on CompleteMultipartUpload (measured: a second complete over an
existing key succeeds), so a multipart object is guarded by the remote lock
(engine/remote/lock.py: one writer at a time) and a HEAD just before the
complete. After each upload a HEAD checks the size and the ETag, which the
server computes from the bytes it received (the MD5 of a single PUT; of the
parts' MD5s for a multipart one), against what was sent.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import os
import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.errors import BackupfsError, ErrnoError
from engine.remote.digest import Checksum, StreamDigest, multipart_etag
from engine.remote.location import S3Location

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
ATTEMPTS = 3  # the first try and two retries
# Objects above this go in parallel multipart uploads of PART_SIZE parts.
MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 8 << 20
PARTS_IN_FLIGHT = 8


def env_read_timeout(default: float) -> float:
    """``default``, or BACKUPFS_S3_READ_TIMEOUT (1-300 s) where a test or an
    administrator wants a frozen endpoint noticed sooner or later."""
    try:
        value = float(os.environ.get("BACKUPFS_S3_READ_TIMEOUT", ""))
    except ValueError:
        return default
    return value if 1 <= value <= 300 else default


class RemoteError(ErrnoError):
    """The remote refused or failed at something; the message names it."""


class ObjectExists(RemoteError):
    """A write-once object is there already (412 on If-None-Match: *)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EEXIST)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the remote's prefix
    size: int
    etag: str  # without quotes


def _without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` taken out of its host part."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an endpoint URL that does not parse)"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _unquote(etag: str) -> str:
    return etag.strip('"')


@functools.cache
def _shared_loader() -> Any:
    """botocore's loader of its JSON models, one per process (it caches what it loaded)."""
    import botocore.loaders

    return botocore.loaders.create_loader()


class RemoteStore:
    """One remote's bucket and prefix, through one botocore S3 client (thread-safe)."""

    def __init__(self, what: str, location: S3Location, endpoint: str | None = None,
                 region: str | None = None, read_timeout: float = READ_TIMEOUT,
                 attempts: int = ATTEMPTS) -> None:
        import botocore.session
        from botocore.config import Config

        self.what = what  # "remote offsite (s3://b/p)": how errors name it
        self.location = location
        # A fresh session (credentials, profile and region are read as they are now),
        # with the process's one loader of botocore's service models: loading them is
        # most of a client's making (measured: 70-280 ms each, 10 ms with the loader
        # shared), which a mount or a long-lived process paid for every store.
        session = botocore.session.Session()
        session.register_component("data_loader", _shared_loader())
        self._client = session.create_client(
            "s3",
            endpoint_url=endpoint,  # None: AWS_ENDPOINT_URL (botocore reads it), then AWS's own
            region_name=region or session.get_config_variable("region") or "us-east-1",
            config=Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=read_timeout,
                          retries={"total_max_attempts": attempts, "mode": "standard"},
                          max_pool_connections=PARTS_IN_FLIGHT + 4,
                          # Bodies go with their Content-MD5, which the server checks as it
                          # receives them (and the ETag after): signing a sha256 of each body
                          # too, as botocore does over plain http, cost a hash of every byte
                          # that guards nothing the MD5 does not.
                          s3={"payload_signing_enabled": False},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )
        # What messages name: without a user:password@ that $AWS_ENDPOINT_URL may carry
        # (--endpoint refuses one; the environment's is boto3's to use, not ours to print).
        self.endpoint = _without_userinfo(self._client.meta.endpoint_url)
        self.read_timeout = read_timeout
        self.unreachable: str | None = None  # set once a request could not reach the endpoint
        self.attempts = attempts

    def answer_bound(self, length: int) -> float:
        """Seconds a ranged GET of ``length`` bytes may take in all: its tries' timeouts, and
        a read timeout for each MiB of it (a GET's share of a slow link, with others in
        flight; a slower link raises BACKUPFS_S3_READ_TIMEOUT). botocore's timeouts bound
        each wait for a byte: an endpoint (or a middlebox) that trickles a byte within
        each would hold a reader, and a mount's request, for ever."""
        mib = -(-length // (1 << 20))
        return (CONNECT_TIMEOUT + self.read_timeout) * self.attempts + self.read_timeout * mib

    # -- errors ----------------------------------------------------------------------

    def _error(self, e: Exception, doing: str) -> RemoteError:
        """What went wrong, in one line that names the remote and no secret."""
        from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, HTTPClientError,
                                         NoCredentialsError, PartialCredentialsError, ReadTimeoutError)
        from urllib3.exceptions import ProtocolError
        from urllib3.exceptions import ReadTimeoutError as BodyReadTimeout

        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return RemoteError(f"{self.what}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or ~/.aws/credentials)", errno.EACCES)
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            return self._cut(RemoteError(f"{self.what}: cannot reach the endpoint {self.endpoint} ({doing})",
                                         errno.EHOSTUNREACH))
        if isinstance(e, (ReadTimeoutError, BodyReadTimeout)):
            return self._cut(RemoteError(f"{self.what}: the endpoint {self.endpoint} stopped answering ({doing}; "
                                         f"no answer in {self.read_timeout:.0f} s)", errno.ETIMEDOUT))
        if isinstance(e, (HTTPClientError, ProtocolError)):
            # ConnectionClosedError and the like: a reset, or a send that stalled past
            # the timeout. botocore's text is a URL with the upload's id: not for users.
            return self._cut(RemoteError(f"{self.what}: the connection to the endpoint {self.endpoint} was cut "
                                         f"or stalled ({doing})", errno.ECONNRESET))
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
                return RemoteError(f"{self.what}: the endpoint refused the S3 credentials ({code})", errno.EACCES)
            if code in ("AccessDenied", "Forbidden") or status == 403:
                return RemoteError(f"{self.what}: access denied ({doing})", errno.EACCES)
            if code == "NoSuchBucket":
                return RemoteError(f"{self.what}: the bucket {self.location.bucket} does not exist", errno.ENOENT)
            if code in ("PreconditionFailed", "412") or status == 412:
                return ObjectExists(f"{self.what}: {doing}: the object exists already (objects are written once)")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return RemoteError(f"{self.what}: {doing}: no such object", errno.ENOENT)
            return RemoteError(f"{self.what}: {doing}: {code or status} {err.get('Message') or ''}".rstrip())
        # Anything else botocore or the connection under it raised (a reset, a
        # protocol error half-way through a body): still one line.
        return RemoteError(f"{self.what}: {doing}: {type(e).__name__}: {e}")

    def _cut(self, error: RemoteError) -> RemoteError:
        """Record that the endpoint is out of reach: clean-ups after the failure (aborting
        an upload, releasing the lock) are skipped rather than waited out again; the next
        push does them (a killed push's uploads are aborted; its lock, a dead pid's
        here, is taken over at once)."""
        self.unreachable = self.unreachable or str(error)
        return error

    def _call(self, doing: str, fn: Callable[..., Any], **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, doing) from None

    # -- reading ---------------------------------------------------------------------

    def check_bucket(self) -> None:
        """Fail early, in one line, on credentials, bucket or endpoint (a GET, not a HEAD:
        an error's code, e.g. SignatureDoesNotMatch, comes in a body)."""
        self._call(f"listing {self.location.url}", self._client.list_objects_v2, Bucket=self.location.bucket,
                   Prefix=self.location.key(""), MaxKeys=1)

    def listing(self, under: str = "") -> dict[str, ObjectInfo]:
        """Every object below the prefix (``under`` narrows it), by relative key: one listing."""
        out: dict[str, ObjectInfo] = {}
        prefix = self.location.key(under) if under else (self.location.prefix + "/" if self.location.prefix else "")
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"listing {self.location.url}", self._client.list_objects_v2, **kw)
            for obj in page.get("Contents", []):
                rel = self.location.rel(obj["Key"])
                if rel is not None:
                    out[rel] = ObjectInfo(rel, int(obj["Size"]), _unquote(obj.get("ETag", "")))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def head(self, rel: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        """Size, ETag and user metadata of an object, or None if there is none."""
        try:
            r = self._call(f"reading {rel}", self._client.head_object, Bucket=self.location.bucket,
                           Key=self.location.key(rel))
        except RemoteError as e:
            if e.errno == errno.ENOENT and "no such object" in str(e):
                return None
            raise
        return ObjectInfo(rel, int(r["ContentLength"]), _unquote(r.get("ETag", ""))), dict(r.get("Metadata", {}))

    def get(self, rel: str, limit: int = 64 << 20) -> bytes | None:
        """A small object's bytes (a catalog snapshot, the lock), or None if there is none."""
        try:
            r = self._call(f"reading {rel}", self._client.get_object, Bucket=self.location.bucket,
                           Key=self.location.key(rel))
        except RemoteError as e:
            if e.errno == errno.ENOENT and "no such object" in str(e):
                return None
            raise
        if int(r.get("ContentLength", 0)) > limit:
            r["Body"].close()
            raise RemoteError(f"{self.what}: {rel} is larger than {limit} bytes; not a backupfs object")
        try:
            return bytes(r["Body"].read())
        except Exception as e:  # a read that times out half-way
            raise self._error(e, f"reading {rel}") from None

    def get_range(self, rel: str, offset: int, length: int, sink: Callable[[int, memoryview], None],
                  etag: str | None = None, chunk: int = 1 << 20) -> int:
        """``length`` bytes of an object from ``offset`` (a ranged GET), handed to
        ``sink(position, piece)`` as they arrive, in pieces of up to ``chunk`` bytes;
        the bytes delivered (the caller checks the count: an endpoint that answers
        with more gets one byte past ``length`` delivered, never the rest). With
        ``etag``, only from the object with that ETag (a remote mount's reads never
        mix two versions of an object rewritten by hand).

        In pieces, not one buffer of the whole range: a fresh 8 MiB buffer a GET
        (twice, as urllib3 assembles it) was fresh memory to fault in every time,
        and cost a remote mount's fetchers more CPU than the bytes themselves."""
        kw: dict[str, Any] = {"IfMatch": f'"{etag}"'} if etag else {}
        r = self._call(f"reading {rel}", self._client.get_object, Bucket=self.location.bucket,
                       Key=self.location.key(rel), Range=f"bytes={offset}-{offset + length - 1}", **kw)
        body = r["Body"]
        done = 0
        try:
            while done <= length:
                # One byte more than asked tells an answer longer than the range (a server
                # that ignores Range, or a hostile one) without holding the rest of it.
                data = body.read(min(chunk, length + 1 - done))
                if not data:
                    break
                sink(offset + done, memoryview(data))
                done += len(data)
            return done
        except BackupfsError:
            raise  # the sink's own: it says where
        except Exception as e:
            raise self._error(e, f"reading {rel}") from None
        finally:
            body.close()  # an answer not read to its end: its connection is dropped, not reused

    def stream(self, rel: str, sink: Callable[[bytes], None], chunk: int = 4 << 20) -> int:
        """Read a whole object, in order, into ``sink``; the bytes read."""
        r = self._call(f"reading {rel}", self._client.get_object, Bucket=self.location.bucket,
                       Key=self.location.key(rel))
        body = r["Body"]
        done = 0
        try:
            while True:
                data = body.read(chunk)
                if not data:
                    return done
                sink(data)
                done += len(data)
        except BackupfsError:
            raise  # the sink's own (a full disk where it writes): it says where
        except Exception as e:  # botocore's read timeouts and broken connections, mid-body
            raise self._error(e, f"reading {rel}") from None
        finally:
            body.close()

    # -- writing ---------------------------------------------------------------------

    def put_new(self, rel: str, body: bytes) -> ObjectInfo:
        """Create an object from bytes, never over an existing one; checked after."""
        return self._put_new(rel, body)[0]

    def _put_new(self, rel: str, body: bytes) -> tuple[ObjectInfo, str]:
        """put_new, and the body's MD5 (the ETag it was checked against)."""
        md5 = hashlib.md5(body).digest()
        self._call(f"writing {rel}", self._client.put_object, Bucket=self.location.bucket,
                   Key=self.location.key(rel), Body=body, IfNoneMatch="*", ContentMD5=_b64(md5))
        return self._check(rel, len(body), md5.hex()), md5.hex()

    def delete(self, rels: list[str]) -> None:
        """Delete objects (those the remote no longer needs), a thousand a request."""
        for start in range(0, len(rels), 1000):
            batch = rels[start:start + 1000]
            r = self._call(f"deleting {len(batch)} objects", self._client.delete_objects,
                           Bucket=self.location.bucket,
                           Delete={"Objects": [{"Key": self.location.key(k)} for k in batch], "Quiet": True})
            errors = r.get("Errors") or []
            if errors:
                first = errors[0]
                raise RemoteError(f"{self.what}: cannot delete {first.get('Key')}: {first.get('Code')}")

    def abort_stale_uploads(self) -> int:
        """Abort multipart uploads left under the prefix by a killed push (the lock is
        ours, so none is in use); their parts would cost storage for nothing."""
        prefix = self.location.prefix + "/" if self.location.prefix else ""
        r = self._call("listing multipart uploads", self._client.list_multipart_uploads,
                       Bucket=self.location.bucket, Prefix=prefix)
        count = 0
        for up in r.get("Uploads", []):
            self._call("aborting a multipart upload", self._client.abort_multipart_upload,
                       Bucket=self.location.bucket, Key=up["Key"], UploadId=up["UploadId"])
            count += 1
        return count

    def upload_fd(self, rel: str, fd: int, size: int,
                  on_bytes: Callable[[int], None] | None = None,
                  on_part: Callable[[], None] | None = None) -> tuple[ObjectInfo, Checksum]:
        """Create ``rel`` from the first ``size`` bytes of ``fd`` (read once, with pread);
        parallel multipart above MULTIPART_THRESHOLD. ``on_part`` is called before each
        part is read and before the upload is completed (the push checks and renews
        its lock there). Returns the object as checked
        and its checksum (the ETag the server computed, equal to ours: what the catalog
        records, engine/remote/digest.py)."""
        if size <= MULTIPART_THRESHOLD:
            body = _pread_all(fd, 0, size)
            info, etag = self._put_new(rel, body)
            if on_bytes:
                on_bytes(size)
            return info, Checksum(etag=etag, part_size=0)
        info, etag = self._multipart(rel, fd, size, on_bytes, on_part)
        return info, Checksum(etag=etag, part_size=PART_SIZE)

    def _multipart(self, rel: str, fd: int, size: int,
                   on_bytes: Callable[[int], None] | None, on_part: Callable[[], None] | None
                   ) -> tuple[ObjectInfo, str]:
        bucket, key = self.location.bucket, self.location.key(rel)
        if self.head(rel) is not None:
            raise ObjectExists(f"{self.what}: writing {rel}: the object exists already (objects are written once)")
        up = self._call(f"writing {rel}", self._client.create_multipart_upload, Bucket=bucket, Key=key)
        upload_id = up["UploadId"]
        # PARTS_IN_FLIGHT parts read and sent at once: each into a buffer kept for
        # the whole upload, not a fresh 8 MiB each (fresh memory is faulted in page by
        # page: on this machine that cost more than the part's MD5).
        free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(PARTS_IN_FLIGHT + 1):
            free.put(None)  # a buffer made when first needed
        digests: list[bytes] = []
        futures: list[Future[dict[str, Any]]] = []

        def send(number: int, buf: bytearray, offset: int, length: int) -> dict[str, Any]:
            try:
                # Read here, in the sending threads, not one part after another in the
                # submitting one (there it had been a quarter of the upload's time).
                _pread_into(fd, memoryview(buf)[:length], offset)
                body = buf if length == len(buf) else bytes(memoryview(buf)[:length])
                digests[number - 1] = md5 = hashlib.md5(body).digest()  # here: md5 is the slowest hash
                r = self._call(f"writing {rel} part {number}", self._client.upload_part, Bucket=bucket, Key=key,
                               UploadId=upload_id, PartNumber=number, Body=body, ContentMD5=_b64(md5))
                if on_bytes:
                    on_bytes(length)
                return {"ETag": r["ETag"], "PartNumber": number}
            finally:
                free.put(buf)

        try:
            with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="push-part") as pool:
                for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                    if on_part:
                        on_part()
                    buf = free.get()
                    if buf is None:
                        buf = bytearray(PART_SIZE)
                    digests.append(b"")
                    futures.append(pool.submit(send, number, buf, offset, min(PART_SIZE, size - offset)))
                    failed = [f for f in futures if f.done() and f.exception() is not None]
                    if failed:
                        break
                parts = [f.result() for f in futures]
            if on_part:  # the completion writes the object: a lock lost meanwhile stops it
                on_part()
            if self.head(rel) is not None:
                raise ObjectExists(f"{self.what}: writing {rel}: the object exists already (objects are written once)")
            self._call(f"writing {rel}", self._client.complete_multipart_upload, Bucket=bucket, Key=key,
                       UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                if not self.unreachable:  # else: not another round of timeouts
                    self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:
                pass  # the next push aborts what is left (abort_stale_uploads)
            raise
        etag = multipart_etag(digests)
        return self._check(rel, size, etag), etag

    def _check(self, rel: str, size: int, etag: str) -> ObjectInfo:
        """The object as the server holds it is what was sent: size and ETag (which the
        server computed from the bytes it received)."""
        found = self.head(rel)
        if found is None:
            raise RemoteError(f"{self.what}: {rel} is missing right after its upload")
        info = found[0]
        if info.size != size:
            raise RemoteError(f"{self.what}: {rel}: the server holds {info.size} bytes, {size} were sent")
        if info.etag and info.etag != etag:
            raise RemoteError(f"{self.what}: {rel}: the server's checksum (ETag {info.etag}) is not that of "
                              f"the bytes sent ({etag})")
        return info


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _pread_into(fd: int, into: memoryview, offset: int) -> None:
    """Fill ``into`` from ``offset``; a file that got shorter is an error."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if not n:
            raise ErrnoError(f"a file being pushed ended early at byte {offset + done} "
                             f"(expected {offset + len(into)})")
        done += n


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset``; a file that got shorter is an error."""
    parts: list[bytes] = []
    done = 0
    while done < length:
        chunk = os.pread(fd, min(length - done, 8 << 20), offset + done)
        if not chunk:
            raise ErrnoError(f"a file being pushed ended early at byte {offset + done} (expected {offset + length})")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def local_checksum(fd: int, size: int) -> Checksum:
    """The checksum upload_fd's upload of these bytes gets: to tell whether an object
    a killed push left behind holds them, without sending them again."""
    part = PART_SIZE if size > MULTIPART_THRESHOLD else 0
    digest = StreamDigest(part)
    for offset in range(0, size, PART_SIZE):
        digest.update(_pread_all(fd, offset, min(PART_SIZE, size - offset)))
    return Checksum(etag=digest.hexdigest(), part_size=part)
