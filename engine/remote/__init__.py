"""Off-site copies on S3-compatible object storage (see developer-notes/remote.md).

One module a job: ``location`` (s3:// URLs and remote names), ``store`` (the
S3 client: bounded time, one-line errors, write-once objects), ``layout``
(object keys and the catalog snapshot format), ``lock`` (the remote's
writer lock), ``localread`` (the local repository read consistently beside
its owner), ``push`` and ``remotecatalog`` (read a remote, or a copy of one).
No FUSE here: the later remote mount builds on ``remotecatalog``.
"""
