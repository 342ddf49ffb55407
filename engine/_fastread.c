/*
 * The chain read loop, in C: what ChainView._fill_python does.
 *
 * Why: a 1 GiB disk 64 layers deep is ~8800 extents, and in Python each
 * costs ~2.4 us of interpreter on top of ~3 us of preadv in the kernel, so
 * a deep read ran at 0.69-0.75x the speed of a shallow one
 * (bench/chain_read.py). Here the loop costs nothing beside the syscalls,
 * and it runs without the GIL, so a worker thread waiting for the disk
 * on one extent no longer takes turns with the event loop between extents.
 *
 * Tried and not kept: copying from mmap'ed layers (mincore to see what is
 * cached, a SIGBUS guard for truncated files and media errors). It only
 * pays once a view's page tables are populated; a fresh view pays a page
 * fault per 64 KiB instead of a preadv, which measured no faster, and in a
 * nowait read a page still under read-ahead I/O looks resident to mincore
 * and blocks the event loop in the fault.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* Extent kinds: must match engine/qcow2/layers.py (checked on import). */
enum { K_DATA = 0, K_ZERO = 1, K_COMPRESSED = 2, K_UNALLOC = 3 };

enum { F_NOWAIT = 1, F_ZEROED = 2 };

/* ---- the read loop -------------------------------------------------------- */

enum { R_DONE = 0, R_WOULDBLOCK = 1, R_ERRNO = 2, R_BADLAYER = 3 };

/* preadv of the whole piece; past the end of the file reads zeros (a short
 * last cluster, as QEMU reads it). */
static int read_piece(int fd, char *dst, uint64_t host, uint64_t n, int nowait, int *err)
{
    uint64_t done = 0;
    while (done < n) {
        struct iovec iov = {dst + done, n - done};
        ssize_t got = preadv2(fd, &iov, 1, (off_t)(host + done), nowait ? RWF_NOWAIT : 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (nowait && (errno == EAGAIN || errno == EOPNOTSUPP))
                return R_WOULDBLOCK;
            *err = errno;
            return R_ERRNO;
        }
        if (nowait && (uint64_t)got < n - done)
            return R_WOULDBLOCK; /* part cached, or EOF: the waiting read sorts it out */
        if (got == 0) {
            memset(dst + done, 0, n - done);
            return R_DONE;
        }
        done += (uint64_t)got;
    }
    return R_DONE;
}

static PyObject *fastread_fill(PyObject *module, PyObject *args)
{
    Py_buffer out, starts_b, hosts_b, kinds_b, depths_b, fds_b;
    unsigned long long offset, size;
    int flags;
    if (!PyArg_ParseTuple(args, "w*Ky*y*y*y*y*Ki", &out, &offset, &starts_b, &hosts_b, &kinds_b,
                          &depths_b, &fds_b, &size, &flags))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = kinds_b.len;
    Py_ssize_t layers = fds_b.len / (Py_ssize_t)sizeof(int);
    if (starts_b.len != count * 8 || hosts_b.len != count * 8 || depths_b.len != count * 2 || count == 0 ||
        fds_b.len != layers * (Py_ssize_t)sizeof(int)) {
        PyErr_SetString(PyExc_ValueError, "index arrays disagree in length");
        goto done;
    }
    const uint64_t *starts = starts_b.buf, *hosts = hosts_b.buf;
    const uint8_t *kinds = kinds_b.buf;
    const uint16_t *depths = depths_b.buf;
    const int *fds = fds_b.buf;
    char *dst = out.buf;
    uint64_t end = offset + (uint64_t)out.len;
    if (end > size || offset > end) {
        PyErr_SetString(PyExc_ValueError, "read outside the disk");
        goto done;
    }
    uint64_t pos = offset;
    int status = R_DONE, err = 0;
    /* A nowait read (the mount's event loop) copies from the page cache or
     * stops: it keeps the GIL. Dropping it there cost more than the copy:
     * with decompression threads running Python between their frames, the
     * loop waited for the GIL back after every compressed run. */
    PyThreadState *save = (flags & F_NOWAIT) ? NULL : PyEval_SaveThread();
    /* the last extent starting at or before offset */
    Py_ssize_t lo = 0, hi = count;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (starts[mid] <= offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    Py_ssize_t i = lo > 0 ? lo - 1 : 0;
    while (pos < end) {
        uint64_t stop = i + 1 < count ? starts[i + 1] : size;
        if (stop > end)
            stop = end;
        uint8_t kind = kinds[i];
        char *piece = dst + (pos - offset);
        uint64_t n = stop - pos;
        if (kind == K_DATA) {
            Py_ssize_t d = depths[i];
            if (d >= layers) {
                status = R_BADLAYER;
                break;
            }
            uint64_t host = hosts[i] + (pos - starts[i]);
            status = read_piece(fds[d], piece, host, n, flags & F_NOWAIT, &err);
            if (status != R_DONE)
                break;
        } else if (kind == K_COMPRESSED) {
            break; /* the caller decompresses it and calls again after it */
        } else if (!(flags & F_ZEROED)) {
            memset(piece, 0, n);
        }
        pos = stop;
        i++;
    }
    if (save != NULL)
        PyEval_RestoreThread(save);
    if (status == R_WOULDBLOCK) {
        result = PyLong_FromLong(-1);
    } else if (status == R_BADLAYER) {
        PyErr_SetString(PyExc_ValueError, "an extent names a layer the view does not have");
    } else if (status == R_ERRNO) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = PyLong_FromUnsignedLongLong(pos);
    }
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&starts_b);
    PyBuffer_Release(&hosts_b);
    PyBuffer_Release(&kinds_b);
    PyBuffer_Release(&depths_b);
    PyBuffer_Release(&fds_b);
    return result;
}

/* ---- read-ahead advice ------------------------------------------------------ */

/* One merged run of a layer: pieces of the window that lie back to back in
 * its file. */
typedef struct {
    uint64_t start, end;
    uint16_t depth;
} run_t;

/* advise(offset, end, starts, hosts, kinds, depths, fds, size, streaming, span, dry)
 *
 * What ChainView.advise does: gather the window's data pieces per layer,
 * merged where they lie back to back in the layer's file; leave a layer
 * marked in ``streaming`` to its own read-ahead when its runs span at least
 * ``span`` bytes and fill at least half of that; POSIX_FADV_WILLNEED the
 * rest. At depth 64 a 1 GiB pass gathers ~15,000 pieces: in Python the
 * loop cost as much as the 11,000 fadvise calls, and it ran on the mount's
 * event loop. Returns the advised runs as (depth, start, length) tuples
 * when ``dry`` (for tests; in window order, where Python lists them layer
 * by layer), else their number. */
static PyObject *fastread_advise(PyObject *module, PyObject *args)
{
    Py_buffer starts_b, hosts_b, kinds_b, depths_b, fds_b, streaming_b;
    unsigned long long offset, end, size, span;
    int dry;
    if (!PyArg_ParseTuple(args, "KKy*y*y*y*y*Ky*Kp", &offset, &end, &starts_b, &hosts_b, &kinds_b,
                          &depths_b, &fds_b, &size, &streaming_b, &span, &dry))
        return NULL;
    PyObject *result = NULL;
    run_t *runs = NULL;
    Py_ssize_t *last = NULL;
    uint64_t *lo = NULL, *hi = NULL, *filled = NULL;
    Py_ssize_t count = kinds_b.len;
    Py_ssize_t layers = fds_b.len / (Py_ssize_t)sizeof(int);
    if (starts_b.len != count * 8 || hosts_b.len != count * 8 || depths_b.len != count * 2 || count == 0 ||
        fds_b.len != layers * (Py_ssize_t)sizeof(int) || streaming_b.len != layers || layers == 0) {
        PyErr_SetString(PyExc_ValueError, "index arrays disagree in length");
        goto done;
    }
    if (end > size)
        end = size;
    if (offset >= end) {
        result = dry ? PyList_New(0) : PyLong_FromLong(0);
        goto done;
    }
    const uint64_t *starts = starts_b.buf, *hosts = hosts_b.buf;
    const uint8_t *kinds = kinds_b.buf, *streaming = streaming_b.buf;
    const uint16_t *depths = depths_b.buf;
    const int *fds = fds_b.buf;

    Py_ssize_t i = 0, hi_i = count;
    while (i < hi_i) { /* the last extent starting at or before offset */
        Py_ssize_t mid = i + (hi_i - i) / 2;
        if (starts[mid] <= offset)
            i = mid + 1;
        else
            hi_i = mid;
    }
    i = i > 0 ? i - 1 : 0;
    Py_ssize_t first = i, n_ext = 0;
    while (first + n_ext < count && starts[first + n_ext] < end)
        n_ext++;
    runs = PyMem_Malloc(sizeof(run_t) * (size_t)(n_ext ? n_ext : 1));
    last = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)layers);
    lo = PyMem_Malloc(sizeof(uint64_t) * (size_t)layers);
    hi = PyMem_Malloc(sizeof(uint64_t) * (size_t)layers);
    filled = PyMem_Malloc(sizeof(uint64_t) * (size_t)layers);
    if (!runs || !last || !lo || !hi || !filled) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t nruns = 0, advised = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t d = 0; d < layers; d++) {
        last[d] = -1;
        lo[d] = UINT64_MAX;
        hi[d] = filled[d] = 0;
    }
    uint64_t pos = offset;
    for (; i < count && pos < end; i++) {
        uint64_t stop = i + 1 < count ? starts[i + 1] : size;
        if (stop > end)
            stop = end;
        if (stop <= pos)
            continue;
        if (kinds[i] == K_DATA) {
            uint16_t d = depths[i];
            if (d >= layers) {
                bad = 1;
                break;
            }
            uint64_t host = hosts[i] + (pos - starts[i]), n = stop - pos;
            if (last[d] >= 0 && runs[last[d]].end == host) {
                runs[last[d]].end = host + n;
            } else {
                if (nruns >= n_ext) { /* only an index whose starts do not ascend gets here */
                    bad = 2;
                    break;
                }
                runs[nruns] = (run_t){host, host + n, d};
                last[d] = nruns++;
            }
            if (host < lo[d])
                lo[d] = host;
            if (host + n > hi[d])
                hi[d] = host + n;
            filled[d] += n;
        }
        pos = stop;
    }
    /* A layer left to its own read-ahead: its runs mostly in file order.
     * Marked in lo[] (no longer needed) as UINT64_MAX. */
    for (Py_ssize_t d = 0; !bad && d < layers; d++)
        if (streaming[d] && hi[d] - lo[d] >= span && 2 * filled[d] >= hi[d] - lo[d])
            lo[d] = UINT64_MAX;
    if (!bad && !dry) {
        for (Py_ssize_t r = 0; r < nruns; r++) {
            uint16_t d = runs[r].depth;
            if (lo[d] == UINT64_MAX)
                continue; /* the file's own read-ahead streams it */
            (void)posix_fadvise(fds[d], (off_t)runs[r].start, (off_t)(runs[r].end - runs[r].start),
                                POSIX_FADV_WILLNEED); /* advice only: a failure costs nothing */
            advised++;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad == 1 ? "an extent names a layer the view does not have"
                                                   : "the index's extents are not in disk order");
        goto done;
    }
    if (!dry) {
        result = PyLong_FromSsize_t(advised);
        goto done;
    }
    result = PyList_New(0);
    for (Py_ssize_t r = 0; result && r < nruns; r++) {
        uint16_t d = runs[r].depth;
        if (lo[d] == UINT64_MAX)
            continue;
        PyObject *t = Py_BuildValue("(iKK)", (int)d, (unsigned long long)runs[r].start,
                                    (unsigned long long)(runs[r].end - runs[r].start));
        if (!t || PyList_Append(result, t) < 0)
            Py_CLEAR(result);
        Py_XDECREF(t);
    }
done:
    PyMem_Free(runs);
    PyMem_Free(last);
    PyMem_Free(lo);
    PyMem_Free(hi);
    PyMem_Free(filled);
    PyBuffer_Release(&starts_b);
    PyBuffer_Release(&hosts_b);
    PyBuffer_Release(&kinds_b);
    PyBuffer_Release(&depths_b);
    PyBuffer_Release(&fds_b);
    PyBuffer_Release(&streaming_b);
    return result;
}

static PyMethodDef fastread_methods[] = {
    {"fill", fastread_fill, METH_VARARGS,
     "fill(out, offset, starts, hosts, kinds, depths, fds, size, flags) -> position reached "
     "(a compressed extent stops it), or -1 when a nowait read would block."},
    {"advise", fastread_advise, METH_VARARGS,
     "advise(offset, end, starts, hosts, kinds, depths, fds, size, streaming, span, dry) -> "
     "runs advised (or, dry, the list of (depth, start, length) it would advise)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastread_module = {
    PyModuleDef_HEAD_INIT, "engine._fastread", "The chain read loop in C (see engine/chain.py).", -1,
    fastread_methods,
};

PyMODINIT_FUNC PyInit__fastread(void)
{
    PyObject *mod = PyModule_Create(&fastread_module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddIntConstant(mod, "DATA", K_DATA) < 0 ||
        PyModule_AddIntConstant(mod, "ZERO", K_ZERO) < 0 ||
        PyModule_AddIntConstant(mod, "COMPRESSED", K_COMPRESSED) < 0 ||
        PyModule_AddIntConstant(mod, "UNALLOC", K_UNALLOC) < 0 ||
        PyModule_AddIntConstant(mod, "NOWAIT", F_NOWAIT) < 0 ||
        PyModule_AddIntConstant(mod, "ZEROED", F_ZEROED) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
