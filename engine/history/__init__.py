"""What changed between backups, and every version of a file (SPEC §9).

    blocks     the disk byte ranges that may differ between two backups, from the chains' tables
    compare    one path in two backups: added, deleted, content or metadata changed
    treediff   the whole-tree comparison (any filesystem): the fallback
    extdiff    ext2/3/4: only the inodes and directories in changed blocks are compared
    changes    the orchestration per volume, rendering, and the cache per backup pair
    versions   the distinct versions of one path across a device's backups
"""
