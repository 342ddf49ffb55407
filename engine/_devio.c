/*
 * A live device's reads and writes in C, callable without the GIL.
 *
 * Why: a VM on the device file sends many small requests at once (4 KiB,
 * 16 in flight). Served by Python on the mount's one event loop, each
 * costs ~40 us of interpreter and trio scheduling, so the device topped
 * out at 17-29k IOPS where QEMU's own FUSE export serves 44-47k. The mount
 * (backupfs/_relay.c) hands such requests to this code from its own
 * threads; everything that is not the plain case is declined (-1) and goes
 * the Python way, which knows every rule and says every error:
 *
 *   - a job is running (copy-before-write), or a job is starting or ending
 *     (the gate is held exclusively: block() waits out the writes in here);
 *   - the write would reach past the source's end (cut behind our back);
 *   - another program wrote the source since our last write (its mtime
 *     moved while none of our writes was in flight): Device distrusts;
 *   - any error, short read or short write (Python redoes it and reports).
 *
 * A write marks both active dirty bitmaps before it writes, as
 * Device.write does; bits are set with atomic ORs so concurrent writers
 * (here or in Python, through mark()) never lose one another's bits. The
 * bitmaps' buffers are replaced only while blocked (set_bitmaps), so a
 * writer in here never marks a bitmap a job has frozen.
 *
 * The mtime bookkeeping (what our own writes made the source's mtime, how
 * many of our writes are in flight) lives here for both paths, under one
 * lock, so Python's and C's writes account for each other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <linux/fs.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "_devio.h"

typedef struct {
    PyObject_HEAD
    int fd;
    uint64_t size;
    int shift;
    uint64_t nbits;
    Py_buffer bm[2];
    int nbm;
    pthread_mutex_t lock; /* seen_ns, in_flight */
    int64_t seen_ns;
    long in_flight; /* pwrites under way, both paths */
    atomic_int users; /* C requests in here */
    atomic_int blocked;
    atomic_int writes_on;
    atomic_ullong fast_reads, fast_writes, declined;
} DevIO;

static int64_t mtime_ns(const struct stat *st) {
    return (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

static void mark_bits(DevIO *d, uint64_t off, uint64_t len) {
    if (len == 0 || off >= d->size) return;
    uint64_t end = off + len;
    if (end > d->size) end = d->size;
    uint64_t first = off >> d->shift, last = (end - 1) >> d->shift;
    for (int i = 0; i < d->nbm; i++) {
        unsigned char *b = d->bm[i].buf;
        for (uint64_t g = first; g <= last; g++) {
            unsigned char bit = (unsigned char)(1u << (g & 7)); /* little-endian bitarray */
            if (!(__atomic_load_n(&b[g >> 3], __ATOMIC_RELAXED) & bit))
                __atomic_fetch_or(&b[g >> 3], bit, __ATOMIC_RELAXED);
        }
    }
}

static int enter(DevIO *d) {
    atomic_fetch_add(&d->users, 1);
    if (atomic_load(&d->blocked)) {
        atomic_fetch_sub(&d->users, 1);
        return 0;
    }
    return 1;
}

static ssize_t decline(DevIO *d) {
    atomic_fetch_add(&d->declined, 1);
    atomic_fetch_sub(&d->users, 1);
    return -1;
}

static ssize_t devio_read(void *self, uint64_t off, size_t len, char *buf) {
    DevIO *d = self;
    if (!enter(d)) { atomic_fetch_add(&d->declined, 1); return -1; }
    if (off >= d->size || len == 0) {
        atomic_fetch_sub(&d->users, 1);
        return 0;
    }
    if (len > d->size - off) len = (size_t)(d->size - off);
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(d->fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return decline(d); /* an error, or the source ends early */
        done += (size_t)n;
    }
    atomic_fetch_add(&d->fast_reads, 1);
    atomic_fetch_sub(&d->users, 1);
    return (ssize_t)len;
}

static int source_size(DevIO *d, const struct stat *st, uint64_t *out) {
    if (!S_ISBLK(st->st_mode)) {
        *out = (uint64_t)st->st_size;
        return 0;
    }
    return ioctl(d->fd, BLKGETSIZE64, out);
}

static void write_done(DevIO *d) {
    struct stat st;
    pthread_mutex_lock(&d->lock);
    if (fstat(d->fd, &st) == 0 && mtime_ns(&st) > d->seen_ns) d->seen_ns = mtime_ns(&st);
    d->in_flight--;
    pthread_mutex_unlock(&d->lock);
}

static ssize_t devio_write(void *self, uint64_t off, const char *buf, size_t len) {
    DevIO *d = self;
    if (!enter(d)) { atomic_fetch_add(&d->declined, 1); return -1; }
    if (!atomic_load(&d->writes_on) || off >= d->size || len == 0) return decline(d);
    if (len > d->size - off) len = (size_t)(d->size - off);
    struct stat before;
    uint64_t actual;
    if (fstat(d->fd, &before) != 0 || source_size(d, &before, &actual) != 0 || actual < off + len)
        return decline(d);
    mark_bits(d, off, len); /* first: a failed write may still have changed bytes */
    pthread_mutex_lock(&d->lock);
    if (S_ISREG(before.st_mode) && d->in_flight == 0 && mtime_ns(&before) > d->seen_ns) {
        pthread_mutex_unlock(&d->lock);
        return decline(d); /* another program wrote it: Python notices and distrusts */
    }
    d->in_flight++;
    pthread_mutex_unlock(&d->lock);
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(d->fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            write_done(d);
            return decline(d);
        }
        done += (size_t)n;
    }
    write_done(d);
    atomic_fetch_add(&d->fast_writes, 1);
    atomic_fetch_sub(&d->users, 1);
    return (ssize_t)len;
}

/* -- Python face -------------------------------------------------------------------- */

static void release_bitmaps(DevIO *d) {
    for (int i = 0; i < d->nbm; i++) PyBuffer_Release(&d->bm[i]);
    d->nbm = 0;
}

static int DevIO_init(DevIO *d, PyObject *args, PyObject *kw) {
    static char *names[] = {"fd", "size", "granularity", "seen_mtime_ns", NULL};
    int fd;
    unsigned long long size, gran;
    long long seen;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKKL", names, &fd, &size, &gran, &seen)) return -1;
    if (gran == 0 || (gran & (gran - 1))) {
        PyErr_SetString(PyExc_ValueError, "granularity must be a power of two");
        return -1;
    }
    d->fd = fd;
    d->size = size;
    d->shift = __builtin_ctzll(gran);
    d->nbits = (size + gran - 1) >> d->shift;
    d->seen_ns = seen;
    atomic_store(&d->blocked, 1); /* until set_bitmaps + unblock */
    return 0;
}

static PyObject *DevIO_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    DevIO *d = (DevIO *)type->tp_alloc(type, 0);
    if (d == NULL) return NULL;
    pthread_mutex_init(&d->lock, NULL);
    return (PyObject *)d;
}

static void DevIO_dealloc(DevIO *d) {
    release_bitmaps(d);
    pthread_mutex_destroy(&d->lock);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyObject *DevIO_set_bitmaps(DevIO *d, PyObject *args) {
    PyObject *a, *b;
    if (!PyArg_ParseTuple(args, "OO", &a, &b)) return NULL;
    if (!atomic_load(&d->blocked)) {
        PyErr_SetString(PyExc_RuntimeError, "bitmaps are replaced only while blocked");
        return NULL;
    }
    Py_buffer nb[2];
    PyObject *objs[2] = {a, b};
    for (int i = 0; i < 2; i++) {
        if (PyObject_GetBuffer(objs[i], &nb[i], PyBUF_WRITABLE) < 0) {
            if (i) PyBuffer_Release(&nb[0]);
            return NULL;
        }
        if ((uint64_t)nb[i].len * 8 < d->nbits) {
            for (int j = 0; j <= i; j++) PyBuffer_Release(&nb[j]);
            PyErr_SetString(PyExc_ValueError, "bitmap buffer too small for the device");
            return NULL;
        }
    }
    release_bitmaps(d);
    d->bm[0] = nb[0];
    d->bm[1] = nb[1];
    d->nbm = 2;
    Py_RETURN_NONE;
}

static PyObject *DevIO_block(DevIO *d, PyObject *unused) {
    atomic_fetch_add(&d->blocked, 1);
    if (atomic_load(&d->users)) {
        Py_BEGIN_ALLOW_THREADS
        struct timespec pause = {0, 20000};
        while (atomic_load(&d->users)) nanosleep(&pause, NULL);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *DevIO_unblock(DevIO *d, PyObject *unused) {
    if (atomic_load(&d->blocked) <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "unblock without block");
        return NULL;
    }
    atomic_fetch_sub(&d->blocked, 1);
    Py_RETURN_NONE;
}

static PyObject *DevIO_set_writes(DevIO *d, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    atomic_store(&d->writes_on, on);
    Py_RETURN_NONE;
}

static PyObject *DevIO_mark(DevIO *d, PyObject *args) {
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len)) return NULL;
    if (d->nbm == 0) {
        PyErr_SetString(PyExc_RuntimeError, "no bitmaps set");
        return NULL;
    }
    mark_bits(d, off, len);
    Py_RETURN_NONE;
}

static PyObject *DevIO_note_outside(DevIO *d, PyObject *args) {
    /* Device._noticed_outside_write's test, under the lock shared with C's
     * writes; ``begin``: and count a write of ours under way, in the same hold. */
    long long t;
    int is_reg, racing, begin = 0;
    if (!PyArg_ParseTuple(args, "Lpp|p", &t, &is_reg, &racing, &begin)) return NULL;
    int moved = 0;
    pthread_mutex_lock(&d->lock);
    if (is_reg && d->in_flight == 0 && (racing ? t > d->seen_ns : t != d->seen_ns)) {
        d->seen_ns = t;
        moved = 1;
    }
    if (begin) d->in_flight++;
    pthread_mutex_unlock(&d->lock);
    return PyBool_FromLong(moved);
}

static PyObject *DevIO_begin_write(DevIO *d, PyObject *unused) {
    pthread_mutex_lock(&d->lock);
    d->in_flight++;
    pthread_mutex_unlock(&d->lock);
    Py_RETURN_NONE;
}

static PyObject *DevIO_end_write(DevIO *d, PyObject *arg) {
    long long t = PyLong_AsLongLong(arg);
    if (t == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&d->lock);
    if (t > d->seen_ns) d->seen_ns = t;
    d->in_flight--;
    pthread_mutex_unlock(&d->lock);
    Py_RETURN_NONE;
}

static PyObject *DevIO_get_seen(DevIO *d, void *c) {
    pthread_mutex_lock(&d->lock);
    long long t = d->seen_ns;
    pthread_mutex_unlock(&d->lock);
    return PyLong_FromLongLong(t);
}

static int DevIO_set_seen(DevIO *d, PyObject *v, void *c) {
    long long t = PyLong_AsLongLong(v);
    if (t == -1 && PyErr_Occurred()) return -1;
    pthread_mutex_lock(&d->lock);
    d->seen_ns = t;
    pthread_mutex_unlock(&d->lock);
    return 0;
}

static PyObject *DevIO_stats(DevIO *d, PyObject *unused) {
    return Py_BuildValue("KKK", (unsigned long long)atomic_load(&d->fast_reads),
                         (unsigned long long)atomic_load(&d->fast_writes),
                         (unsigned long long)atomic_load(&d->declined));
}

static PyObject *DevIO_serve_write(DevIO *d, PyObject *args) {
    /* What the relay calls, for tests without a mount: bytes written, or -1 (declined). */
    unsigned long long off;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "Ky*", &off, &b)) return NULL;
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = devio_write(d, off, b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(n);
}

static PyObject *DevIO_serve_read(DevIO *d, PyObject *args) {
    /* The relay's read, for tests: the bytes, or None (declined). */
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "KK", &off, &len)) return NULL;
    if (len > (1u << 30)) {
        PyErr_SetString(PyExc_ValueError, "too long");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (out == NULL) return NULL;
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = devio_read(d, off, (size_t)len, PyBytes_AS_STRING(out));
    Py_END_ALLOW_THREADS
    if (n < 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    if (_PyBytes_Resize(&out, n) < 0) return NULL;
    return out;
}

static PyMethodDef DevIO_methods[] = {
    {"serve_write", (PyCFunction)DevIO_serve_write, METH_VARARGS,
     "serve_write(offset, data) -> bytes written, or -1: declined (what the relay does)"},
    {"serve_read", (PyCFunction)DevIO_serve_read, METH_VARARGS,
     "serve_read(offset, length) -> bytes, or None: declined (what the relay does)"},
    {"set_bitmaps", (PyCFunction)DevIO_set_bitmaps, METH_VARARGS,
     "set_bitmaps(a, b): the two active bitmaps' buffers (only while blocked)"},
    {"block", (PyCFunction)DevIO_block, METH_NOARGS,
     "decline every request from now on, and wait for those in C to end"},
    {"unblock", (PyCFunction)DevIO_unblock, METH_NOARGS, "undo one block()"},
    {"set_writes", (PyCFunction)DevIO_set_writes, METH_O, "whether writes may run here (no job, writable)"},
    {"mark", (PyCFunction)DevIO_mark, METH_VARARGS, "mark(offset, length) in both bitmaps, atomically"},
    {"note_outside", (PyCFunction)DevIO_note_outside, METH_VARARGS,
     "note_outside(mtime_ns, regular, racing, begin=False) -> whether another program's write shows"},
    {"begin_write", (PyCFunction)DevIO_begin_write, METH_NOARGS, "a write of ours is under way"},
    {"end_write", (PyCFunction)DevIO_end_write, METH_O, "end_write(mtime_ns): it ended, leaving that mtime"},
    {"stats", (PyCFunction)DevIO_stats, METH_NOARGS, "(reads, writes) served here, and requests declined"},
    {NULL},
};

static PyGetSetDef DevIO_getset[] = {
    {"seen_mtime_ns", (getter)DevIO_get_seen, (setter)DevIO_set_seen,
     "the source's mtime as our own writes left it", NULL},
    {NULL},
};

static PyTypeObject DevIOType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._devio.DevIO",
    .tp_basicsize = sizeof(DevIO),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A device's plain reads and writes, served without the GIL",
    .tp_new = DevIO_new,
    .tp_init = (initproc)DevIO_init,
    .tp_dealloc = (destructor)DevIO_dealloc,
    .tp_methods = DevIO_methods,
    .tp_getset = DevIO_getset,
};

static DevioAPI api = {DEVIO_API_VERSION, devio_read, devio_write, &DevIOType};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "engine._devio", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__devio(void) {
    if (PyType_Ready(&DevIOType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&DevIOType);
    if (PyModule_AddObject(m, "DevIO", (PyObject *)&DevIOType) < 0) return NULL;
    PyObject *cap = PyCapsule_New(&api, DEVIO_CAPSULE, NULL);
    if (cap == NULL || PyModule_AddObject(m, "_C_API", cap) < 0) return NULL;
    return m;
}
