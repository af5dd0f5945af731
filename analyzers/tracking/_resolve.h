/* The per-read part of resolving a batch of bars' reads (_resolve.c), called by
 * _fastread.c's resolve_buffers with each bar's packed reads. */
#ifndef FMEL_RESOLVE_H
#define FMEL_RESOLVE_H
#include <Python.h>
#include <stdint.h>

/* One bar's reads: n rows of (tag id, ago, size, bar index) int64, a value and a flag each;
 * the value is a number when the flag equals the input's ``float_flag``. Read without the
 * GIL: the caller keeps the arrays alive and unchanged until fr_resolve returns. */
typedef struct {
    const int64_t *ints;
    const double *vals;
    const unsigned char *flag;
    int64_t n;
} ReadChunk;

/* See _resolve.c. ``state``: (n_bars, n_slots, 4) int64, the feeds' captured positions. Called
 * with the GIL held; releases it while computing. */
PyObject *fr_resolve(const ReadChunk *chunks, Py_ssize_t n_bars, unsigned char float_flag,
                     const int64_t *state, Py_ssize_t n_slots, PyObject *src,
                     PyObject *len_src, PyObject *field_code_of_tag, PyObject *sym_of_slot,
                     Py_ssize_t n_syms, Py_ssize_t n_fields);
#endif
