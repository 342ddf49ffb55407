/* The C face of engine._devio, for the mount's request relay (backupfs/_relay.c).
 * read/write return the bytes done, or -1: declined, serve it the Python way. */
#ifndef BACKUPFS_DEVIO_H
#define BACKUPFS_DEVIO_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define DEVIO_CAPSULE "engine._devio._C_API"
#define DEVIO_API_VERSION 1

typedef struct {
    int version;
    ssize_t (*read)(void *dev, uint64_t off, size_t len, char *buf);
    ssize_t (*write)(void *dev, uint64_t off, const char *buf, size_t len);
    void *type; /* the DevIO type object: what register() accepts */
} DevioAPI;
#endif
