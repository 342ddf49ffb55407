/*
 * The mount's request relay: threads in C that read the FUSE device, serve
 * a device file's reads and writes themselves (engine/_devio.c), and pass
 * every other request to pyfuse3 unchanged.
 *
 * Why: pyfuse3 serves every request on one Python thread, one trio task
 * switch, one epoll round and a coroutine each, ~40 us a request. A VM's
 * disk with 16 small requests in flight therefore ran at 17-29k IOPS where
 * QEMU's FUSE export (C, a coroutine per request) serves 44-47k. Here the
 * plain case (no job, no error) costs two syscalls and no GIL, in several
 * threads at once.
 *
 * How: libfuse reads requests from, and writes replies to, its session's
 * file descriptor. We keep the FUSE device under a new descriptor and put
 * one end of a SOCK_SEQPACKET socket pair at the old number (dup3), so
 * libfuse and pyfuse3 run unchanged on the other side of a message-for-
 * message pipe: a request we pass is one message, a reply one message back.
 * The socket's buffers are sized for the largest request and reply (1 MiB
 * of data plus headers); where the system will not allow that, start()
 * fails and the mount runs as before, all in pyfuse3.
 *
 * Threads: READERS threads read the device (non-blocking, woken by poll,
 * stopped through an eventfd), one forwards pyfuse3's replies to the
 * device. A reader that finds the connection gone (ENODEV: unmounted)
 * shuts the socket, and pyfuse3's loop ends as it did when it read the
 * device itself. Notifications (invalidations) are written by the caller
 * straight to the device, synchronously as pyfuse3's own did, never through
 * the forwarder: the kernel may take a directory's lock for one, and a lookup
 * holding it would wait for a reply queued behind it.
 *
 * The INIT reply is the one we change: a larger max_background lets the
 * kernel keep more asynchronous direct I/O requests in flight (its default,
 * 12, is below the 16 a VM's queue holds); pyfuse3 has no way to ask.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/epoll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_devio.h"

#define MAX_DATA (1u << 20)
#define BUF_SIZE (MAX_DATA + 16384) /* the largest request or reply, with headers */
#define MAX_READERS 16

static DevioAPI *devio;

typedef struct {
    uint64_t fh;
    void *dev; /* a DevIO, referenced while in the table */
} Entry;

typedef struct {
    PyObject_HEAD
    int dev_fd; /* the FUSE device */
    int ours;   /* our end of the socket pair */
    int stop_fd;
    int ended_fd; /* readable once the connection is gone (unmounted) */
    int nreaders;
    pthread_t readers[MAX_READERS];
    pthread_t forwarder;
    int started;
    int stopped;
    unsigned max_background;
    atomic_ullong init_unique; /* the INIT request's, to find its reply */
    pthread_rwlock_t table_lock;
    Entry *table;
    size_t count, cap;
    atomic_ullong served, passed;
} Relay;

static void *lookup(Relay *r, uint64_t fh) {
    for (size_t i = 0; i < r->count; i++)
        if (r->table[i].fh == fh) return r->table[i].dev;
    return NULL;
}

static void reply_error(Relay *r, uint64_t unique, int err) {
    struct fuse_out_header out = {sizeof out, -err, unique};
    (void)!write(r->dev_fd, &out, sizeof out);
}

/* Serve a READ or WRITE of a registered handle: 1 done, 0 declined. The
 * table lock is held (shared) across it, so unregister() waits for it. */
static int serve(Relay *r, const char *req, size_t n, char *out) {
    const struct fuse_in_header *in = (const void *)req;
    int done = 0;
    pthread_rwlock_rdlock(&r->table_lock);
    if (in->opcode == FUSE_READ && n >= sizeof *in + sizeof(struct fuse_read_in)) {
        const struct fuse_read_in *rd = (const void *)(req + sizeof *in);
        void *dev = lookup(r, rd->fh);
        if (dev != NULL && rd->size <= MAX_DATA) {
            ssize_t got = devio->read(dev, rd->offset, rd->size, out + sizeof(struct fuse_out_header));
            if (got >= 0) {
                struct fuse_out_header *o = (void *)out;
                o->len = (uint32_t)(sizeof *o + (size_t)got);
                o->error = 0;
                o->unique = in->unique;
                (void)!write(r->dev_fd, out, o->len); /* ENOENT: interrupted and gone */
                done = 1;
            }
        }
    } else if (in->opcode == FUSE_WRITE && n >= sizeof *in + sizeof(struct fuse_write_in)) {
        const struct fuse_write_in *wr = (const void *)(req + sizeof *in);
        size_t header = sizeof *in + sizeof *wr;
        void *dev = lookup(r, wr->fh);
        if (dev != NULL && header + wr->size <= n) {
            ssize_t put = devio->write(dev, wr->offset, req + header, wr->size);
            if (put >= 0) {
                struct {
                    struct fuse_out_header h;
                    struct fuse_write_out w;
                } o = {{sizeof o, 0, in->unique}, {(uint32_t)put, 0}};
                (void)!write(r->dev_fd, &o, sizeof o);
                done = 1;
            }
        }
    }
    pthread_rwlock_unlock(&r->table_lock);
    return done;
}

static void *reader(void *arg) {
    Relay *r = arg;
    char *req = malloc(BUF_SIZE), *out = malloc(BUF_SIZE);
    int ep = -1;
    if (req == NULL || out == NULL) goto end;
    /* One wakeup per request, not one per reader (EPOLLEXCLUSIVE): with
     * poll() every idle reader woke for each request and all but one found
     * nothing. The stop eventfd wakes them all. */
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event dev_ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = r->dev_fd};
    struct epoll_event stop_ev = {.events = EPOLLIN, .data.fd = r->stop_fd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, r->dev_fd, &dev_ev) < 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, r->stop_fd, &stop_ev) < 0)
        goto end;
    for (;;) {
        struct epoll_event ev;
        int k = epoll_wait(ep, &ev, 1, -1);
        if (k < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (k == 0) continue;
        if (ev.data.fd == r->stop_fd) break;
        ssize_t n = read(r->dev_fd, req, BUF_SIZE);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ENOENT) continue;
            break; /* ENODEV: unmounted */
        }
        if ((size_t)n < sizeof(struct fuse_in_header)) continue;
        const struct fuse_in_header *in = (const void *)req;
        if ((in->opcode == FUSE_READ || in->opcode == FUSE_WRITE) && serve(r, req, (size_t)n, out)) {
            atomic_fetch_add(&r->served, 1);
            continue;
        }
        if (in->opcode == FUSE_INIT) atomic_store(&r->init_unique, in->unique);
        atomic_fetch_add(&r->passed, 1);
        if (send(r->ours, req, (size_t)n, MSG_NOSIGNAL) < 0) {
            if (errno == EINTR) continue;
            reply_error(r, in->unique, EIO);
            if (errno == EPIPE) break;
        }
    }
end:
    if (ep >= 0) close(ep);
    free(req);
    free(out);
    /* The connection is gone (or we stop): the mount's loop, told through
     * ended_fd, ends pyfuse3's loop as the device's ENODEV did (a socket
     * can only say EOF, which libfuse takes for an error). */
    uint64_t one = 1;
    (void)!write(r->ended_fd, &one, sizeof one);
    return NULL;
}

static void widen_init(Relay *r, char *msg, size_t n) {
    struct fuse_out_header *h = (void *)msg;
    if (h->error != 0 || n < sizeof *h + offsetof(struct fuse_init_out, max_write)) return;
    struct fuse_init_out *init = (void *)(msg + sizeof *h);
    if (init->max_background < r->max_background) {
        init->max_background = (uint16_t)r->max_background;
        init->congestion_threshold = (uint16_t)(r->max_background * 3 / 4);
    }
}

static void *forwarder(void *arg) {
    Relay *r = arg;
    char *msg = malloc(BUF_SIZE);
    if (msg == NULL) return NULL;
    for (;;) {
        ssize_t n = recv(r->ours, msg, BUF_SIZE, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break; /* pyfuse3 closed its end */
        if ((size_t)n < sizeof(struct fuse_out_header)) continue;
        struct fuse_out_header *h = (void *)msg;
        unsigned long long init = atomic_load(&r->init_unique);
        if (init && h->unique == init) {
            widen_init(r, msg, (size_t)n);
            atomic_store(&r->init_unique, 0);
        }
        (void)!write(r->dev_fd, msg, (size_t)n); /* ENOENT: the request was interrupted */
    }
    free(msg);
    return NULL;
}

/* libfuse reads its requests by splice() where it can: from our socket that
 * needs a kernel that splices from any socket (6.5 and later); an older one
 * refuses (EINVAL), and libfuse would fail on its first read. */
static int socket_splices(void) {
    int pair[2], pipe_fds[2], ok = 0;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) return 0;
    if (pipe2(pipe_fds, O_CLOEXEC) == 0) {
        char msg[64] = {0};
        if (send(pair[0], msg, sizeof msg, MSG_NOSIGNAL) == (ssize_t)sizeof msg)
            ok = splice(pair[1], NULL, pipe_fds[1], NULL, 4096, SPLICE_F_NONBLOCK) == (ssize_t)sizeof msg;
        close(pipe_fds[0]);
        close(pipe_fds[1]);
    }
    close(pair[0]);
    close(pair[1]);
    return ok;
}

static int size_buffers(int fd) {
    int want = 2 * BUF_SIZE + 65536;
    for (int opt = 0; opt < 2; opt++) {
        int which = opt == 0 ? SO_SNDBUF : SO_RCVBUF;
        int got = 0;
        socklen_t len = sizeof got;
        setsockopt(fd, SOL_SOCKET, which, &want, sizeof want);
        getsockopt(fd, SOL_SOCKET, which, &got, &len);
        if (got < (int)(2 * BUF_SIZE)) {
            int force = opt == 0 ? SO_SNDBUFFORCE : SO_RCVBUFFORCE; /* root may exceed the limits */
            setsockopt(fd, SOL_SOCKET, force, &want, sizeof want);
            len = sizeof got;
            getsockopt(fd, SOL_SOCKET, which, &got, &len);
            if (got < (int)(2 * BUF_SIZE)) return -1;
        }
    }
    return 0;
}

/* -- Python face -------------------------------------------------------------------- */

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (r == NULL) return NULL;
    r->dev_fd = r->ours = r->stop_fd = r->ended_fd = -1;
    /* Writers first: an open or close of the device file waits only for the
     * requests in C now, not for a stream of new ones. */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&r->table_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return (PyObject *)r;
}

static void Relay_dealloc(Relay *r) {
    if (r->ended_fd >= 0) close(r->ended_fd);
    for (size_t i = 0; i < r->count; i++) Py_DECREF((PyObject *)r->table[i].dev);
    PyMem_Free(r->table);
    pthread_rwlock_destroy(&r->table_lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Relay_start(Relay *r, PyObject *args, PyObject *kw) {
    static char *names[] = {"session_fd", "readers", "max_background", NULL};
    int session_fd, nreaders = 4;
    unsigned max_background = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|iI", names, &session_fd, &nreaders, &max_background))
        return NULL;
    if (r->started) {
        PyErr_SetString(PyExc_RuntimeError, "already started");
        return NULL;
    }
    if (nreaders < 1 || nreaders > MAX_READERS) {
        PyErr_SetString(PyExc_ValueError, "readers out of range");
        return NULL;
    }
    r->max_background = max_background > 65535 ? 65535 : max_background;
    int pair[2] = {-1, -1};
    int dev_fd = -1, stop_fd = -1, ended_fd = -1;
    if (!socket_splices()) {
        errno = EOPNOTSUPP;
        goto fail;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) goto fail;
    if (size_buffers(pair[0]) < 0 || size_buffers(pair[1]) < 0) {
        errno = ENOBUFS;
        goto fail;
    }
    if ((stop_fd = eventfd(0, EFD_CLOEXEC)) < 0) goto fail;
    if ((ended_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) goto fail;
    if ((dev_fd = fcntl(session_fd, F_DUPFD_CLOEXEC, 3)) < 0) goto fail;
    if (fcntl(dev_fd, F_SETFL, fcntl(dev_fd, F_GETFL) | O_NONBLOCK) < 0) goto fail;
    /* From here on pyfuse3's descriptor is the socket. */
    if (dup3(pair[1], session_fd, O_CLOEXEC) < 0) goto fail;
    close(pair[1]);
    r->dev_fd = dev_fd;
    r->ours = pair[0];
    r->stop_fd = stop_fd;
    r->ended_fd = ended_fd;
    /* Our threads take no signals: the daemon's handlers run in its main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&r->forwarder, NULL, forwarder, r);
    for (int i = 0; err == 0 && i < nreaders; i++) {
        err = pthread_create(&r->readers[i], NULL, reader, r);
        if (err == 0) r->nreaders++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    r->started = 1;
    if (err != 0 && r->nreaders == 0) {
        /* Nothing reads the device now: cannot go back (the number is the socket). */
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
fail: {
    int e = errno;
    if (pair[0] >= 0) close(pair[0]);
    if (pair[1] >= 0) close(pair[1]);
    if (stop_fd >= 0) close(stop_fd);
    if (ended_fd >= 0) close(ended_fd);
    if (dev_fd >= 0) close(dev_fd);
    errno = e;
    return PyErr_SetFromErrno(PyExc_OSError);
}
}

static PyObject *Relay_stop(Relay *r, PyObject *unused) {
    /* After pyfuse3 has unmounted and closed its end: stop the readers,
     * release the device (the kernel then ends the connection, as it did
     * when pyfuse3 closed it), and drop every registered device. */
    if (!r->started || r->stopped) Py_RETURN_NONE;
    r->stopped = 1;
    uint64_t one = 1;
    (void)!write(r->stop_fd, &one, sizeof one);
    shutdown(r->ours, SHUT_RDWR);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < r->nreaders; i++) pthread_join(r->readers[i], NULL);
    pthread_join(r->forwarder, NULL);
    Py_END_ALLOW_THREADS
    close(r->dev_fd);
    close(r->ours);
    close(r->stop_fd);
    r->dev_fd = r->ours = r->stop_fd = -1; /* ended_fd stays: the loop may still watch it */
    pthread_rwlock_wrlock(&r->table_lock);
    size_t n = r->count;
    Entry *t = r->table;
    r->table = NULL;
    r->count = r->cap = 0;
    pthread_rwlock_unlock(&r->table_lock);
    for (size_t i = 0; i < n; i++) Py_DECREF((PyObject *)t[i].dev);
    PyMem_Free(t);
    Py_RETURN_NONE;
}

static PyObject *Relay_register(Relay *r, PyObject *args) {
    unsigned long long fh;
    PyObject *dev;
    if (!PyArg_ParseTuple(args, "KO", &fh, &dev)) return NULL;
    if (!PyObject_TypeCheck(dev, (PyTypeObject *)devio->type)) {
        PyErr_SetString(PyExc_TypeError, "register(fh, DevIO)");
        return NULL;
    }
    if (r->stopped) Py_RETURN_NONE;
    Entry *grown = NULL;
    if (r->count == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 8;
        grown = PyMem_Malloc(cap * sizeof(Entry));
        if (grown == NULL) return PyErr_NoMemory();
        memcpy(grown, r->table, r->count * sizeof(Entry));
    }
    Py_INCREF(dev);
    Entry *old = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&r->table_lock);
    Py_END_ALLOW_THREADS
    if (grown != NULL) {
        old = r->table;
        r->table = grown;
        r->cap = r->cap ? 2 * r->cap : 8;
    }
    r->table[r->count].fh = fh;
    r->table[r->count].dev = dev;
    r->count++;
    pthread_rwlock_unlock(&r->table_lock);
    PyMem_Free(old);
    Py_RETURN_NONE;
}

static PyObject *Relay_unregister(Relay *r, PyObject *arg) {
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    PyObject *dev = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&r->table_lock); /* waits for the requests in C */
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < r->count; i++) {
        if (r->table[i].fh == fh) {
            dev = r->table[i].dev;
            r->table[i] = r->table[--r->count];
            break;
        }
    }
    pthread_rwlock_unlock(&r->table_lock);
    Py_XDECREF(dev);
    return PyBool_FromLong(dev != NULL);
}

static PyObject *Relay_notify(Relay *r, PyObject *arg) {
    /* Write a notification (a whole fuse_out_header message) to the device,
     * in the calling thread, and return its errno (0: done). */
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    int err = 0;
    if (r->dev_fd < 0) {
        err = ENOTCONN;
    } else {
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = write(r->dev_fd, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
        if (n < 0) err = errno;
    }
    PyBuffer_Release(&b);
    return PyLong_FromLong(err);
}

static PyObject *Relay_stats(Relay *r, PyObject *unused) {
    return Py_BuildValue("KK", (unsigned long long)atomic_load(&r->served),
                         (unsigned long long)atomic_load(&r->passed));
}

static PyObject *Relay_ended_fd(Relay *r, void *unused) { return PyLong_FromLong(r->ended_fd); }

static PyGetSetDef Relay_getset[] = {
    {"ended_fd", (getter)Relay_ended_fd, NULL, "readable once the FUSE connection is gone", NULL},
    {NULL},
};

static PyMethodDef Relay_methods[] = {
    {"start", (PyCFunction)(void (*)(void))Relay_start, METH_VARARGS | METH_KEYWORDS,
     "start(session_fd, readers=4, max_background=64): take the FUSE device from pyfuse3's session"},
    {"stop", (PyCFunction)Relay_stop, METH_NOARGS, "stop the threads and release the device"},
    {"register", (PyCFunction)Relay_register, METH_VARARGS, "register(fh, devio): serve this handle here"},
    {"unregister", (PyCFunction)Relay_unregister, METH_O, "unregister(fh): no longer (waits for its requests)"},
    {"notify", (PyCFunction)Relay_notify, METH_O, "notify(message) -> errno: write a notification now"},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "(requests served here, requests passed to pyfuse3)"},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "backupfs._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Serves device reads and writes in C; passes everything else to pyfuse3",
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "backupfs._relay", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__relay(void) {
    devio = PyCapsule_Import(DEVIO_CAPSULE, 0);
    if (devio == NULL) return NULL;
    if (devio->version != DEVIO_API_VERSION) {
        PyErr_SetString(PyExc_ImportError, "engine._devio is another version");
        return NULL;
    }
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) return NULL;
    return m;
}
