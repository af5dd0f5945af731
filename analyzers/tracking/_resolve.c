/* The per-read part of FMEL's vectorised resolution (analyzers/tracking/columns.py), in C and
 * without the GIL. ``_fastread.resolve_buffers`` (in _fastread.c) hands over a batch's bars as
 * their ReadBuffers' own arrays and the feeds' captured positions; ``fr_resolve`` returns what
 * ``columns._kernel_np`` (numpy) returns for the same reads, array for array:
 *
 *   - which bars resolve as columns (every read of the bar is the common read, see columns.py;
 *     a feed whose array offset moves within the batch sends every bar reading it elsewhere);
 *   - the reads of those bars grouped by (bar, symbol) in order of the symbol's first read in
 *     the bar, each group's distinct fields in order of first read;
 *   - the distinct (feed, bar index) pairs read, in ascending order, and each read's position
 *     among them (the caller looks their bar times and data hashes up once each).
 *
 * The reads are not copied first (no ``unpack``), and nothing here calls Python while the
 * GIL is released: the writer thread's resolving no longer holds back the bar loop
 * (docs/benchmarks.md, twenty-third pass). Integer arithmetic wraps as numpy's int64 does.
 * Returns None when no read resolves, and NotImplemented when the distinct pairs are spread
 * too widely for a table (a read of a bar far in the past beside the current ones, in a batch
 * of few reads): the caller then uses numpy, which sorts. Any thread;
 * tests/unit/test_fmel_columns.py compares it with numpy (Hypothesis). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_resolve.h"

typedef int64_t i64;

/* A read of a bar index at or past this goes to the per-read path (columns.MAX_BAR_INDEX: numpy's
 * keys, feed x index, stay within int64). */
#define MAX_BAR_INDEX ((i64)1 << 40)
/* With more feeds than this, nothing resolves as columns (columns.MAX_SLOTS: the same). */
#define MAX_SLOTS ((i64)1 << 22)

static inline i64
wadd(i64 a, i64 b)
{
    return (i64)((uint64_t)a + (uint64_t)b);
}

static inline i64
wsub(i64 a, i64 b)
{
    return (i64)((uint64_t)a - (uint64_t)b);
}

/* A C-contiguous buffer (read flat) of int64 items. */
static int
get_array(PyObject *obj, Py_buffer *view, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *f = view->format == NULL ? "B" : view->format;
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (view->itemsize != 8 || (strcmp(f, "l") != 0 && strcmp(f, "q") != 0)) {
        PyErr_Format(PyExc_TypeError, "resolve_buffers(): %s is not a C-contiguous int64 array",
                     name);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* Work arrays (PyMem_Raw: allocated and freed without the GIL), and the outputs written in
 * place (the buffers of new bytes objects no other code has seen yet). */
typedef struct {
    unsigned char *bar_ok, *read_at;
    i64 *starts, *new_bar, *done, *smin, *smax, *base, *first_at, *u_rank;
    i64 *u_slot, *u_index, *u_o, *g_bar, *g_sym, *g_slot, *g_cur, *g_u;
    i64 *group_offsets, *access_offsets, *pos, *fields, *fields_offsets, *stamp, *gid, *fstamp;
    i64 n_done, n_kept, n_u, n_groups, n_fields_out, table;
    i64 *seq, *ago, *index, *fcode, *known, *inv; /* outputs, n_kept each, in group order */
    double *value;
} Work;

static void
work_free(Work *w)
{
    void *all[] = {w->bar_ok, w->read_at,  w->starts,  w->new_bar,       w->done,
                   w->smin,   w->smax,     w->base,    w->first_at,      w->u_rank,
                   w->u_slot, w->u_index,  w->u_o,     w->g_bar,         w->g_sym,
                   w->g_slot, w->g_cur,    w->g_u,     w->group_offsets, w->access_offsets,
                   w->pos,    w->fields,   w->fields_offsets, w->stamp,  w->gid,
                   w->fstamp};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) PyMem_RawFree(all[i]);
}

static void *
alloc(i64 n, size_t item)
{
    return PyMem_RawCalloc((size_t)(n > 0 ? n : 1), item);
}

typedef struct {
    const ReadChunk *chunks; /* one per bar */
    unsigned char float_flag;
    const i64 *state, *src, *len_src, *fcode_of_tag, *sym_of_slot;
    i64 n_bars, n_slots, n_tags, n_syms, n_fields;
} Input;

/* The (tag id, ago, size, bar index) of read i of bar b. */
static inline const i64 *
read_of(const Input *in, i64 b, i64 i)
{
    return in->chunks[b].ints + 4 * i;
}

/* The slot of a read known to be the common read (its bar resolves). */
static inline i64
slot_of(const Input *in, const i64 *p)
{
    return p[2] == 0 ? in->len_src[p[0]] : in->src[p[0]];
}

/* Which bars resolve, how many reads they hold, and each feed's range of bar indexes read.
 * 0: done (w->n_kept == 0: nothing resolves); 1: the ranges are too wide for a table (the
 * caller uses numpy); -1: out of memory. No Python call: runs without the GIL. */
static int
which_bars(const Input *in, Work *w)
{
    const i64 B = in->n_bars, S = in->n_slots;
    w->starts = alloc(B + 1, 8);
    w->bar_ok = alloc(B, 1);
    w->read_at = alloc(B * S, 1);
    if (!w->starts || !w->bar_ok || !w->read_at) return -1;
    for (i64 b = 0; b < B; b++) w->starts[b + 1] = w->starts[b] + in->chunks[b].n;
    for (i64 b = 0; b < B; b++) w->bar_ok[b] = 1;
    /* each read: its feed (slot), whether it is the common read, within the feed's buffer */
    for (i64 b = 0; b < B; b++) {
        const ReadChunk *c = &in->chunks[b];
        for (i64 i = 0; i < c->n; i++) {
            const i64 *p = c->ints + 4 * i;
            i64 t = p[0], size = p[2], idx = p[3];
            int counts = size == 0;
            i64 sl = -1;
            if (t >= 0 && t < in->n_tags) sl = counts ? in->len_src[t] : in->src[t];
            int is_num = c->flag[i] == in->float_flag;
            int ok = ((size == 1 && is_num) || counts) && sl >= 0 && sl < S;
            if (!ok) sl = 0;
            const i64 *st = in->state + (b * S + sl) * 4;
            i64 cur = wsub(st[0], 1), off = wsub(cur, st[1]), nbuf = wadd(st[2], off);
            ok = ok && idx >= 0 && idx >= off && (idx <= cur || counts) && idx < nbuf &&
                 idx < MAX_BAR_INDEX;
            if (!ok) w->bar_ok[b] = 0;
            w->read_at[b * S + sl] = 1;
        }
    }
    /* one array offset per feed within the batch */
    for (i64 s = 0; s < S; s++) {
        int seen = 0;
        i64 lo = 0, hi = 0;
        for (i64 b = 0; b < B; b++) {
            if (!w->read_at[b * S + s]) continue;
            const i64 *st = in->state + (b * S + s) * 4;
            i64 off = wsub(wsub(st[0], 1), st[1]);
            if (!seen) {
                lo = hi = off;
                seen = 1;
            }
            else if (off < lo) lo = off;
            else if (off > hi) hi = off;
        }
        if (seen && lo != hi)
            for (i64 b = 0; b < B; b++)
                if (w->read_at[b * S + s]) w->bar_ok[b] = 0;
    }
    w->new_bar = alloc(B, 8);
    w->done = alloc(B, 8);
    w->smin = alloc(S, 8);
    w->smax = alloc(S, 8);
    w->base = alloc(S + 1, 8);
    if (!w->new_bar || !w->done || !w->smin || !w->smax || !w->base) return -1;
    for (i64 s = 0; s < S; s++) {
        w->smin[s] = INT64_MAX;
        w->smax[s] = -1;
    }
    i64 n_done = 0, n_kept = 0;
    for (i64 b = 0; b < B; b++) {
        if (!w->bar_ok[b]) continue;
        w->new_bar[b] = n_done;
        w->done[n_done++] = b;
        n_kept += in->chunks[b].n;
        for (i64 i = 0; i < in->chunks[b].n; i++) {
            const i64 *p = read_of(in, b, i);
            i64 sl = slot_of(in, p), idx = p[3];
            if (idx < w->smin[sl]) w->smin[sl] = idx;
            if (idx > w->smax[sl]) w->smax[sl] = idx;
        }
    }
    w->n_done = n_done;
    w->n_kept = n_kept;
    if (n_kept == 0) return 0;
    /* the distinct (feed, bar index) pairs: a table per feed over the range it read */
    const i64 limit = 4 * n_kept + 65536;
    i64 table = 0;
    for (i64 s = 0; s < S; s++) {
        w->base[s] = table;
        if (w->smax[s] >= 0) {
            i64 width = w->smax[s] - w->smin[s] + 1; /* both in [0, INT64_MAX]: no overflow */
            if (width > limit || table > limit - width) return 1;
            table += width;
        }
    }
    w->table = table;
    return 0;
}

/* The resolved bars' groups, fields, distinct pairs and accesses (the outputs w->seq...
 * w->value, n_kept each, allocated by the caller). -1: out of memory. Without the GIL. */
static int
group_reads(const Input *in, Work *w)
{
    const i64 S = in->n_slots, K = w->n_kept, D = w->n_done;
    /* a group per (bar, symbol): at most one per read, and per bar per symbol */
    i64 cap = D <= K / in->n_syms ? D * in->n_syms : K;
    w->first_at = alloc(w->table, 8);
    w->u_rank = alloc(w->table, 8);
    w->g_bar = alloc(cap, 8);
    w->g_sym = alloc(cap, 8);
    w->g_slot = alloc(cap, 8);
    w->access_offsets = alloc(cap + 1, 8);
    w->stamp = alloc(in->n_syms, 8);
    w->gid = alloc(in->n_syms, 8);
    if (!w->first_at || !w->u_rank || !w->g_bar || !w->g_sym || !w->g_slot ||
        !w->access_offsets || !w->stamp || !w->gid)
        return -1;
    for (i64 j = 0; j < w->table; j++) w->first_at[j] = -1;
    /* pass 1: the first read of each distinct pair; the groups, in order of first read */
    for (i64 s = 0; s < in->n_syms; s++) w->stamp[s] = -1;
    i64 k = 0, G = 0;
    for (i64 d = 0; d < D; d++) {
        i64 b = w->done[d];
        for (i64 i = 0; i < in->chunks[b].n; i++, k++) {
            const i64 *p = read_of(in, b, i);
            i64 sl = slot_of(in, p);
            i64 at = w->base[sl] + (p[3] - w->smin[sl]);
            if (w->first_at[at] < 0) w->first_at[at] = w->starts[b] + i;
            i64 sym = in->sym_of_slot[sl];
            if (w->stamp[sym] != d) {
                w->stamp[sym] = d;
                w->gid[sym] = G;
                w->g_bar[G] = b;
                w->g_sym[G] = sym;
                w->g_slot[G] = sl;
                G++;
            }
            w->access_offsets[w->gid[sym] + 1]++;
        }
    }
    w->n_groups = G;
    for (i64 g = 0; g < G; g++) w->access_offsets[g + 1] += w->access_offsets[g];
    /* the distinct pairs, ascending (by slot, then bar index) */
    i64 n_u = 0;
    for (i64 j = 0; j < w->table; j++) n_u += w->first_at[j] >= 0;
    w->u_slot = alloc(n_u, 8);
    w->u_index = alloc(n_u, 8);
    w->u_o = alloc(n_u, 8);
    w->pos = alloc(G, 8);
    w->group_offsets = alloc(D + 1, 8);
    w->g_cur = alloc(G, 8);
    w->g_u = alloc(G, 8);
    if (!w->u_slot || !w->u_index || !w->u_o || !w->pos || !w->group_offsets || !w->g_cur ||
        !w->g_u)
        return -1;
    i64 u = 0;
    for (i64 s = 0; s < S; s++) {
        if (w->smax[s] < 0) continue;
        for (i64 idx = w->smin[s]; idx <= w->smax[s]; idx++) {
            i64 at = w->base[s] + (idx - w->smin[s]);
            i64 r = w->first_at[at];
            if (r < 0) continue;
            w->u_rank[at] = u;
            w->u_slot[u] = s;
            w->u_index[u] = idx;
            /* the feed's array offset at the bar of that first read */
            /* the bar holding read r: the last b with starts[b] <= r (then r < starts[b + 1]) */
            i64 lo = 0, hi = in->n_bars;
            while (hi - lo > 1) {
                i64 mid = lo + (hi - lo) / 2;
                if (w->starts[mid] <= r) lo = mid;
                else hi = mid;
            }
            const i64 *st = in->state + (lo * S + s) * 4;
            w->u_o[u] = wsub(wsub(st[0], 1), st[1]);
            u++;
        }
    }
    w->n_u = n_u;
    /* pass 2: each read to its place (groups in order, reads in order within a group) */
    for (i64 g = 0; g < G; g++) w->pos[g] = w->access_offsets[g];
    for (i64 s = 0; s < in->n_syms; s++) w->stamp[s] = -1;
    i64 g_next = 0;
    for (i64 d = 0; d < D; d++) {
        i64 b = w->done[d];
        const ReadChunk *c = &in->chunks[b];
        for (i64 i = 0; i < c->n; i++) {
            const i64 *p = c->ints + 4 * i;
            i64 sl = slot_of(in, p), idx = p[3];
            i64 sym = in->sym_of_slot[sl];
            if (w->stamp[sym] != d) {
                w->stamp[sym] = d;
                w->gid[sym] = g_next++;
            }
            i64 j = w->pos[w->gid[sym]]++;
            int counts = p[2] == 0;
            w->seq[j] = i;
            w->ago[j] = p[1];
            w->index[j] = idx;
            w->fcode[j] = counts ? 0 : in->fcode_of_tag[p[0]];
            w->value[j] = counts ? (double)wadd(idx, 1) : c->vals[i];
            w->known[j] = in->state[(b * S + sl) * 4 + 3];
            w->inv[j] = w->u_rank[w->base[sl] + (idx - w->smin[sl])];
        }
    }
    /* each resolved bar's groups; each group's feed at the bar and that pair among the
     * distinct ones */
    for (i64 g = 0; g < G; g++) {
        i64 s = w->g_slot[g], b = w->g_bar[g];
        w->group_offsets[w->new_bar[b] + 1]++;
        const i64 *st = in->state + (b * S + s) * 4;
        i64 cur = wsub(st[0], 1);
        int held = cur >= 0 && cur < st[3]; /* its data hash is known */
        w->g_cur[g] = held ? cur : -1;
        w->g_u[g] = -1;
        if (held && w->smax[s] >= 0 && cur >= w->smin[s] && cur <= w->smax[s]) {
            i64 at = w->base[s] + (cur - w->smin[s]);
            if (w->first_at[at] >= 0) w->g_u[g] = w->u_rank[at];
        }
    }
    for (i64 d = 0; d < D; d++) w->group_offsets[d + 1] += w->group_offsets[d];
    /* fields_accessed: each group's distinct fields in order of first read */
    i64 fcap = G <= K / in->n_fields ? G * in->n_fields : K;
    w->fields = alloc(fcap, 8);
    w->fields_offsets = alloc(G + 1, 8);
    w->fstamp = alloc(in->n_fields, 8);
    if (!w->fields || !w->fields_offsets || !w->fstamp) return -1;
    for (i64 f = 0; f < in->n_fields; f++) w->fstamp[f] = -1;
    i64 F = 0;
    for (i64 g = 0; g < G; g++) {
        for (i64 j = w->access_offsets[g]; j < w->access_offsets[g + 1]; j++) {
            i64 f = w->fcode[j];
            if (w->fstamp[f] != g) {
                w->fstamp[f] = g;
                w->fields[F++] = f;
            }
        }
        w->fields_offsets[g + 1] = F;
    }
    w->n_fields_out = F;
    return 0;
}

static PyObject *
as_bytes(const void *data, i64 n)
{
    return PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)(n * 8));
}

#define N_OUT 7 /* the per-access outputs, written in place */

PyObject *
fr_resolve(const ReadChunk *chunks, Py_ssize_t n_bars, unsigned char float_flag,
           const int64_t *state, Py_ssize_t n_slots, PyObject *src, PyObject *len_src,
           PyObject *field_code_of_tag, PyObject *sym_of_slot, Py_ssize_t n_syms,
           Py_ssize_t n_fields)
{
    static const char *names[4] = {"src", "len_src", "field_code_of_tag", "sym_of_slot"};
    PyObject *objs[4] = {src, len_src, field_code_of_tag, sym_of_slot};
    Py_buffer views[4];
    memset(views, 0, sizeof(views));
    PyObject *result = NULL, *outs[N_OUT] = {NULL};
    i64 *small = NULL; /* copies of the four arrays: another thread may change the originals */
    Work w;
    memset(&w, 0, sizeof(w));
    int got = 0;
    for (; got < 4; got++)
        if (get_array(objs[got], &views[got], names[got]) < 0) goto done;
    Py_ssize_t n_tags = views[0].len / 8;
    int bad = n_slots < 1 || views[3].len / 8 != n_slots;
    bad |= views[1].len != views[0].len || views[2].len != views[0].len;
    bad |= n_syms < 1 || n_fields < 1;
    if (bad) {
        PyErr_SetString(PyExc_ValueError,
                        "resolve_buffers(): the arrays' lengths do not agree (src, len_src, "
                        "field_code_of_tag: one per tag; sym_of_slot: one per slot; n_slots, "
                        "n_syms, n_fields >= 1)");
        goto done;
    }
    small = PyMem_RawMalloc((size_t)(3 * n_tags + n_slots + 1) * 8);
    if (small == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(small, views[0].buf, (size_t)n_tags * 8);
    memcpy(small + n_tags, views[1].buf, (size_t)n_tags * 8);
    memcpy(small + 2 * n_tags, views[2].buf, (size_t)n_tags * 8);
    memcpy(small + 3 * n_tags, views[3].buf, (size_t)n_slots * 8);
    Input in;
    in.chunks = chunks;
    in.float_flag = float_flag;
    in.state = state;
    in.src = small;
    in.len_src = small + n_tags;
    in.fcode_of_tag = small + 2 * n_tags;
    in.sym_of_slot = small + 3 * n_tags;
    in.n_bars = n_bars;
    in.n_tags = n_tags;
    in.n_slots = n_slots;
    /* the work tables are as long as the largest code used, not the counts given */
    in.n_syms = 1;
    for (i64 s = 0; s < n_slots; s++) {
        if (in.sym_of_slot[s] < 0 || in.sym_of_slot[s] >= n_syms) {
            PyErr_SetString(PyExc_ValueError, "resolve_buffers(): a symbol code is out of range");
            goto done;
        }
        if (in.sym_of_slot[s] >= in.n_syms) in.n_syms = in.sym_of_slot[s] + 1;
    }
    in.n_fields = 1; /* code 0: len() */
    for (i64 t = 0; t < n_tags; t++) {
        if (in.fcode_of_tag[t] < 0 || in.fcode_of_tag[t] >= n_fields) {
            PyErr_SetString(PyExc_ValueError, "resolve_buffers(): a field code is out of range");
            goto done;
        }
        if (in.fcode_of_tag[t] >= in.n_fields) in.n_fields = in.fcode_of_tag[t] + 1;
    }
    /* codes as resolve_columns numbers them: at most a symbol a feed, a field a tag (and
     * len); sparser ones (helper-92: 2**40, tables that long) are left to numpy */
    if (in.n_syms > n_slots || in.n_fields > n_tags + 1) {
        result = Py_NewRef(Py_NotImplemented);
        goto done;
    }
    /* more feeds than MAX_SLOTS: no bar resolves as columns (numpy's keys, feed x bar index,
     * would not fit an int64) */
    if (n_slots > MAX_SLOTS) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = which_bars(&in, &w);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (rc == 1 || w.n_kept == 0) {
        result = Py_NewRef(rc == 1 ? Py_NotImplemented : Py_None);
        goto done;
    }
    for (int i = 0; i < N_OUT; i++) {
        outs[i] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(w.n_kept * 8));
        if (outs[i] == NULL) goto done;
    }
    w.seq = (i64 *)PyBytes_AS_STRING(outs[0]);
    w.ago = (i64 *)PyBytes_AS_STRING(outs[1]);
    w.index = (i64 *)PyBytes_AS_STRING(outs[2]);
    w.fcode = (i64 *)PyBytes_AS_STRING(outs[3]);
    w.value = (double *)PyBytes_AS_STRING(outs[4]);
    w.known = (i64 *)PyBytes_AS_STRING(outs[5]);
    w.inv = (i64 *)PyBytes_AS_STRING(outs[6]);
    Py_BEGIN_ALLOW_THREADS
    rc = group_reads(&in, &w);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    /* (done, group_offsets, group_bar, group_sym, group_slot, group_cur (-1: its hash is not
     *  known), group_u (-1: not among the distinct pairs, or its hash is not known),
     *  access_offsets, fields_offsets, fields, seq, ago, index, field_code, value, known, inv,
     *  u_slot, u_index, u_offset) */
    result = Py_BuildValue(
        "(NNNNNNNNNNOOOOOOONNN)", as_bytes(w.done, w.n_done),
        as_bytes(w.group_offsets, w.n_done + 1), as_bytes(w.g_bar, w.n_groups),
        as_bytes(w.g_sym, w.n_groups), as_bytes(w.g_slot, w.n_groups),
        as_bytes(w.g_cur, w.n_groups), as_bytes(w.g_u, w.n_groups),
        as_bytes(w.access_offsets, w.n_groups + 1), as_bytes(w.fields_offsets, w.n_groups + 1),
        as_bytes(w.fields, w.n_fields_out), outs[0], outs[1], outs[2], outs[3], outs[4], outs[5],
        outs[6], as_bytes(w.u_slot, w.n_u), as_bytes(w.u_index, w.n_u), as_bytes(w.u_o, w.n_u));
done:
    for (int i = 0; i < N_OUT; i++) Py_XDECREF(outs[i]); /* the result holds its own */
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_RawFree(small);
    work_free(&w);
    return result;
}
