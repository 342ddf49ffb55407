"""The backup engine: image format, bitmaps, chains, jobs, catalog (no FUSE).

numpy is here for its vectorised array work, never for linear algebra, yet
the OpenBLAS it links starts a worker thread per CPU at import, and that
thread spins while the main thread is busy: measured on `backupfs image
cat` of a 64-deep 1 GiB chain, 110 ms more CPU per run (725-820 ms against
613-677) on a 2-CPU machine. One BLAS thread means none is started. Set
before any engine module imports numpy; an explicit setting wins.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
