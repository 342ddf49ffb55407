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
#include <poll.h>
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
    void *dev; /* a DevIO, referenced while in the table; NULL: read by the reader callback */
} Entry;

typedef struct {
    PyObject_HEAD
    int session_fd; /* pyfuse3's descriptor number: the socket while we run */
    int dev_fd; /* the FUSE device */
    int ours;   /* our end of the socket pair */
    int stop_fd;
    int ended_fd; /* readable once the connection is gone (unmounted) */
    int nreaders;
    atomic_int readers_alive;
    pthread_mutex_t go_lock; /* the threads wait for go: 1 run, -1 never started */
    pthread_cond_t go_cond;
    int go;
    pthread_t readers[MAX_READERS];
    pthread_t forwarder;
    int started;
    int stopped;
    atomic_int stopping;
    unsigned max_background;
    PyObject *read_cb; /* reads of a backup: called with the GIL, see serve() */
    atomic_ullong init_unique; /* the INIT request's, to find its reply */
    pthread_rwlock_t table_lock;
    Entry *table;
    size_t count, cap;
    atomic_ullong served, read_by_python, passed;
} Relay;

static Entry *lookup(Relay *r, uint64_t fh) {
    for (size_t i = 0; i < r->count; i++)
        if (r->table[i].fh == fh) return &r->table[i];
    return NULL;
}

/* A read the Python callback serves in this thread, straight into the reply
 * buffer: bytes read, -errno, or -1000 (declined: pass it to pyfuse3). A
 * backup's reply then crosses no socket (two copies of up to 1 MiB) and
 * waits for no event loop; the callback's chain read runs without the GIL. */
#define DECLINED (-1000)
static ssize_t python_read(Relay *r, uint64_t fh, uint64_t off, uint32_t size, char *into) {
    ssize_t result = DECLINED;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *cb = r->read_cb;
    if (cb != NULL) {
        PyObject *view = PyMemoryView_FromMemory(into, size, PyBUF_WRITE);
        PyObject *got = view ? PyObject_CallFunction(cb, "KKIO", (unsigned long long)fh,
                                                     (unsigned long long)off, size, view) : NULL;
        if (got == NULL) {
            PyErr_WriteUnraisable(cb);
            result = -EIO;
        } else if (got != Py_None) {
            long n = PyLong_AsLong(got);
            if (n == -1 && PyErr_Occurred()) {
                PyErr_WriteUnraisable(cb);
                n = -EIO;
            }
            result = n > (long)size ? -EIO : n;
        }
        Py_XDECREF(got);
        if (view != NULL) {
            /* Nothing may keep our buffer past this call. */
            PyObject *released = PyObject_CallMethod(view, "release", NULL);
            if (released == NULL) {
                PyErr_WriteUnraisable(view);
                result = -EIO;
            }
            Py_XDECREF(released);
            Py_DECREF(view);
        }
    }
    PyGILState_Release(gil);
    return result;
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
        Entry *e = lookup(r, rd->fh);
        if (e != NULL && rd->size <= MAX_DATA) {
            char *data = out + sizeof(struct fuse_out_header);
            ssize_t got = e->dev != NULL ? devio->read(e->dev, rd->offset, rd->size, data)
                                         : python_read(r, rd->fh, rd->offset, rd->size, data);
            struct fuse_out_header *o = (void *)out;
            if (got >= 0) {
                o->len = (uint32_t)(sizeof *o + (size_t)got);
                o->error = 0;
                o->unique = in->unique;
                (void)!write(r->dev_fd, out, o->len); /* ENOENT: interrupted and gone */
                done = 1;
            } else if (e->dev == NULL && got != DECLINED) {
                reply_error(r, in->unique, (int)-got);
                done = 1;
            }
            if (done && e->dev == NULL) atomic_fetch_add(&r->read_by_python, 1);
        }
    } else if (in->opcode == FUSE_WRITE && n >= sizeof *in + sizeof(struct fuse_write_in)) {
        const struct fuse_write_in *wr = (const void *)(req + sizeof *in);
        size_t header = sizeof *in + sizeof *wr;
        Entry *e = lookup(r, wr->fh);
        if (e != NULL && e->dev != NULL && header + wr->size <= n) {
            ssize_t put = devio->write(e->dev, wr->offset, req + header, wr->size);
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

/* Threads are made before pyfuse3's descriptor is taken, and wait here: a
 * start that fails then leaves pyfuse3 as it was, no request read. */
static int wait_for_go(Relay *r) {
    pthread_mutex_lock(&r->go_lock);
    while (r->go == 0) pthread_cond_wait(&r->go_cond, &r->go_lock);
    int go = r->go;
    pthread_mutex_unlock(&r->go_lock);
    return go > 0;
}

static void set_go(Relay *r, int go) {
    pthread_mutex_lock(&r->go_lock);
    r->go = go;
    pthread_cond_broadcast(&r->go_cond);
    pthread_mutex_unlock(&r->go_lock);
}

static void tell_ended(Relay *r) {
    uint64_t one = 1;
    (void)!write(r->ended_fd, &one, sizeof one);
}

static void *reader(void *arg) {
    Relay *r = arg;
    char *req = NULL, *out = NULL;
    int ep = -1, gone = 0;
    if (!wait_for_go(r)) return NULL;
    req = malloc(BUF_SIZE);
    out = malloc(BUF_SIZE);
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
            gone = errno == ENODEV; /* unmounted */
            break;
        }
        if ((size_t)n < sizeof(struct fuse_in_header)) continue;
        const struct fuse_in_header *in = (const void *)req;
        if ((in->opcode == FUSE_READ || in->opcode == FUSE_WRITE) && serve(r, req, (size_t)n, out)) {
            atomic_fetch_add(&r->served, 1);
            continue;
        }
        if (in->opcode == FUSE_INIT) atomic_store(&r->init_unique, in->unique);
        atomic_fetch_add(&r->passed, 1);
        ssize_t sent;
        do sent = send(r->ours, req, (size_t)n, MSG_NOSIGNAL);
        while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            int err = errno;
            if (in->opcode != FUSE_FORGET && in->opcode != FUSE_BATCH_FORGET) reply_error(r, in->unique, EIO);
            if (err == EPIPE) break;
        }
    }
end:
    if (ep >= 0) close(ep);
    free(req);
    free(out);
    /* The connection is gone: the mount's loop, told through ended_fd, ends
     * pyfuse3's loop as the device's ENODEV did (a socket can only say EOF,
     * which libfuse takes for an error). So does the last reader to go for
     * any other reason: nothing would read requests any more. A stop()
     * needs no telling. */
    if (atomic_fetch_sub(&r->readers_alive, 1) == 1 || gone) {
        if (!atomic_load(&r->stopping)) tell_ended(r);
    }
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

static void forward(Relay *r, char *msg, size_t n) {
    if (n < sizeof(struct fuse_out_header)) return;
    struct fuse_out_header *h = (void *)msg;
    unsigned long long init = atomic_load(&r->init_unique);
    if (init && h->unique == init) {
        widen_init(r, msg, n);
        atomic_store(&r->init_unique, 0);
    }
    (void)!write(r->dev_fd, msg, n); /* ENOENT: the request was interrupted */
}

static void *forwarder(void *arg) {
    Relay *r = arg;
    if (!wait_for_go(r)) return NULL;
    char *msg = malloc(BUF_SIZE);
    if (msg == NULL) {
        /* pyfuse3's replies would go nowhere: end the mount rather than hang it. */
        tell_ended(r);
        return NULL;
    }
    for (;;) {
        struct pollfd p[2] = {{r->ours, POLLIN, 0}, {r->stop_fd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (p[0].revents & POLLIN) {
            ssize_t n = recv(r->ours, msg, BUF_SIZE, MSG_DONTWAIT);
            if (n > 0) forward(r, msg, (size_t)n);
            else if (n == 0 || (errno != EAGAIN && errno != EINTR)) break;
            continue;
        }
        if (p[0].revents & (POLLHUP | POLLERR)) break;
        if (p[1].revents) {
            /* Stopping: pass on the replies pyfuse3 left, then go. */
            ssize_t n;
            while ((n = recv(r->ours, msg, BUF_SIZE, MSG_DONTWAIT)) > 0) forward(r, msg, (size_t)n);
            break;
        }
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
    r->session_fd = r->dev_fd = r->ours = r->stop_fd = r->ended_fd = -1;
    pthread_mutex_init(&r->go_lock, NULL);
    pthread_cond_init(&r->go_cond, NULL);
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
    if (r->started && !r->stopped) return; /* its threads still use it: leaked, not freed under them */
    if (r->ended_fd >= 0) close(r->ended_fd);
    for (size_t i = 0; i < r->count; i++) Py_XDECREF((PyObject *)r->table[i].dev);
    Py_CLEAR(r->read_cb);
    free(r->table);
    pthread_mutex_destroy(&r->go_lock);
    pthread_cond_destroy(&r->go_cond);
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
    int dev_fd = -1, stop_fd = -1, ended_fd = -1, err = 0;
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
    r->session_fd = session_fd;
    r->dev_fd = dev_fd;
    r->ours = pair[0];
    r->stop_fd = stop_fd;
    r->ended_fd = ended_fd;
    r->go = 0;
    /* The threads first, waiting for go; they take no signals (the daemon's
     * handlers run in its main thread). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int forwarder_made = 0;
    err = pthread_create(&r->forwarder, NULL, forwarder, r);
    forwarder_made = err == 0;
    for (int i = 0; err == 0 && i < nreaders; i++) {
        err = pthread_create(&r->readers[i], NULL, reader, r);
        if (err == 0) r->nreaders++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    /* Then the device: non-blocking for our readers, the socket at pyfuse3's number. */
    if (err == 0 && fcntl(dev_fd, F_SETFL, fcntl(dev_fd, F_GETFL) | O_NONBLOCK) < 0) err = errno;
    if (err == 0 && dup3(pair[1], session_fd, O_CLOEXEC) < 0) {
        err = errno;
        fcntl(dev_fd, F_SETFL, fcntl(dev_fd, F_GETFL) & ~O_NONBLOCK);
    }
    if (err != 0) {
        /* Nothing was read or taken: pyfuse3 keeps its device. */
        set_go(r, -1);
        Py_BEGIN_ALLOW_THREADS
        for (int i = 0; i < r->nreaders; i++) pthread_join(r->readers[i], NULL);
        if (forwarder_made) pthread_join(r->forwarder, NULL);
        Py_END_ALLOW_THREADS
        r->nreaders = 0;
        r->session_fd = r->dev_fd = r->ours = r->stop_fd = r->ended_fd = -1;
        errno = err;
        goto fail;
    }
    close(pair[1]);
    pair[1] = -1;
    atomic_store(&r->readers_alive, r->nreaders);
    r->started = 1;
    set_go(r, 1);
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
    /* After pyfuse3's loop has ended and before it unmounts: stop the
     * threads (the forwarder passes on the replies left), and put the FUSE
     * device back at pyfuse3's number. Its unmount then sees what it saw
     * before the relay: a connection the kernel ended is not unmounted
     * again (whatever is mounted there now stays), and its close releases
     * the device. Registered devices are dropped. */
    if (!r->started || r->stopped) Py_RETURN_NONE;
    r->stopped = 1;
    atomic_store(&r->stopping, 1);
    uint64_t one = 1;
    (void)!write(r->stop_fd, &one, sizeof one);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < r->nreaders; i++) pthread_join(r->readers[i], NULL);
    pthread_join(r->forwarder, NULL);
    Py_END_ALLOW_THREADS
    fcntl(r->dev_fd, F_SETFL, fcntl(r->dev_fd, F_GETFL) & ~O_NONBLOCK);
    int restored = dup3(r->dev_fd, r->session_fd, O_CLOEXEC);
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
    for (size_t i = 0; i < n; i++) Py_XDECREF((PyObject *)t[i].dev);
    free(t);
    Py_CLEAR(r->read_cb);
    if (restored < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *Relay_set_reader(Relay *r, PyObject *cb) {
    /* Before start(): cb(fh, offset, size, buffer) -> bytes read into buffer,
     * -errno, or None (pass the request to pyfuse3). Runs in relay threads. */
    if (r->started) {
        PyErr_SetString(PyExc_RuntimeError, "set the reader before start()");
        return NULL;
    }
    if (!PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "the reader must be callable");
        return NULL;
    }
    Py_INCREF(cb);
    Py_XSETREF(r->read_cb, cb);
    Py_RETURN_NONE;
}

static PyObject *Relay_register(Relay *r, PyObject *args) {
    unsigned long long fh;
    PyObject *dev;
    if (!PyArg_ParseTuple(args, "KO", &fh, &dev)) return NULL;
    if (dev == Py_None) {
        if (r->read_cb == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "no reader set");
            return NULL;
        }
    } else if (!PyObject_TypeCheck(dev, (PyTypeObject *)devio->type)) {
        PyErr_SetString(PyExc_TypeError, "register(fh, DevIO or None)");
        return NULL;
    }
    if (r->stopped) Py_RETURN_NONE;
    if (dev == Py_None) dev = NULL; /* reads go to the reader callback */
    Py_XINCREF(dev);
    int full = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&r->table_lock); /* all of it under the lock: opens register from threads */
    if (r->count == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 8;
        Entry *grown = realloc(r->table, cap * sizeof(Entry));
        if (grown == NULL) full = 1;
        else {
            r->table = grown;
            r->cap = cap;
        }
    }
    if (!full) {
        r->table[r->count].fh = fh;
        r->table[r->count].dev = dev;
        r->count++;
    }
    pthread_rwlock_unlock(&r->table_lock);
    Py_END_ALLOW_THREADS
    if (full) {
        Py_XDECREF(dev);
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyObject *Relay_unregister(Relay *r, PyObject *arg) {
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    PyObject *dev = NULL;
    int found = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&r->table_lock); /* waits for the requests in C */
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < r->count; i++) {
        if (r->table[i].fh == fh) {
            dev = r->table[i].dev;
            r->table[i] = r->table[--r->count];
            found = 1;
            break;
        }
    }
    pthread_rwlock_unlock(&r->table_lock);
    Py_XDECREF(dev);
    return PyBool_FromLong(found);
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
    unsigned long long served = atomic_load(&r->served), reads = atomic_load(&r->read_by_python);
    return Py_BuildValue("KKK", served - reads, reads, (unsigned long long)atomic_load(&r->passed));
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
    {"register", (PyCFunction)Relay_register, METH_VARARGS,
     "register(fh, devio): serve this handle's reads and writes in C; register(fh, None): its reads by the reader"},
    {"set_reader", (PyCFunction)Relay_set_reader, METH_O,
     "set_reader(cb): cb(fh, offset, size, buffer) -> n, -errno or None, called in relay threads"},
    {"unregister", (PyCFunction)Relay_unregister, METH_O, "unregister(fh): no longer (waits for its requests)"},
    {"notify", (PyCFunction)Relay_notify, METH_O, "notify(message) -> errno: write a notification now"},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "(device requests served in C, backup reads served by the reader, requests passed to pyfuse3)"},
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
    PyObject *provider = PyImport_ImportModule("engine._devio"); /* the capsule's module, loaded */
    if (provider == NULL) return NULL;
    Py_DECREF(provider);
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
