/* The compiled hot path of FMEL's tracked line reads (see analyzers/tracking/proxies.py).
 *
 * ``__getitem__`` and ``__len__`` of a tracked backtrader ``LineBuffer`` subclass, doing what
 * the pure-Python ``_plain_getitem`` and ``_plain_len`` of proxies.py do, in the same order:
 *
 *   value = self.array[self._idx + ago]
 *   if ACTIVE:                                   # the proxies module's global
 *       pos = self._idx + ago (+ len(self.array) when negative: Python's wrap-around)
 *       tag = self._fmel
 *       tag.out.append((tag.id, ago, 1, pos + self.lencount - 1 - self._idx, value))
 *       if tag.strict: tag.tracker.check_strict()
 *   elif ago > 0:
 *       self._fmel.tracker.internal_future_read(self, ago, depth=1)   # no frame of its own
 *   return value
 *
 * The line's attributes are read from its instance dict (proxies._dict_safe decides which
 * classes get these methods: none of the names is a property or slot there). Anything else
 * goes to the Python functions given to ``init``, before anything was read or recorded, so
 * results and errors are Python's: a key that is not an exact int, ``_idx`` not an int, an
 * index beyond a C ssize_t, a buffer not of the fast types, an attribute missing from the
 * dict, a class with its own attribute lookup, keyword or extra arguments, and an ``ACTIVE``
 * that is not exactly True or False (the tail after the value is read: ``_plain_tail``).
 * Numbers other than exact small ints (a float ``lencount``, a big int) are computed with
 * Python's number protocol. Main thread only (backtrader's), under the GIL.
 *
 * ``tag.out`` is the tracker's per-bar read buffer: a ``ReadBuffer`` (below) when the tracker
 * uses the compiled reads, else a list. Into a ``ReadBuffer`` the common read (exact ints that
 * fit an int64, the value an exact float or None) is appended as C numbers, without a tuple or
 * an int object; any other read is appended as the same 5-tuple would be (``append``), and
 * the buffer gives back equal tuples (the value object itself when it was not a float).
 *
 * Also ``unpack`` and ``unpack_buffers``: a batch's raw reads as columns, for the decision
 * writer (any thread); and ``resolve_buffers`` (with _resolve.c), the per-read part of
 * resolving them, without the GIL.
 *
 * Why C: a Python-level ``__getitem__`` costs a frame per read, and these reads are the bar
 * loop's most frequent operation (docs/benchmarks.md, benchmarks/bench_instructions.py).
 * Built by ``make`` (setup.py); tests/unit/test_fastread.py compares it with the Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_record.h"
#include "_resolve.h"

static PyObject *g_globals = NULL;        /* proxies.__dict__: ACTIVE is read there per call */
static uint64_t g_active_version = 0;     /* g_globals' ma_version_tag when ACTIVE was read */
static int g_active_state = 0;            /* what active_state() found then */
static PyObject *g_fallback = NULL;       /* proxies._plain_getitem */
static PyObject *g_tail = NULL;           /* proxies._plain_tail */
static PyObject *g_len_fallback = NULL;   /* proxies._plain_len */
static PyObject *g_fast_types = NULL;     /* buffer types indexed in C: (array, deque, list) */
static PyObject *s_ACTIVE, *s_array, *s__idx, *s_lencount, *s__fmel, *s_out, *s_id, *s_strict,
    *s_tracker, *s_check_strict, *s_internal_future_read, *s_append, *s_extension;
static PyObject *k_zero, *k_one;
/* count_by_attribute(cls, name): a hashes object of exactly ``cls`` whose class ``__len__`` is
 * still the function registered, with the same code, answers ``len()`` in capture() by its
 * attribute ``name`` when that is an exact int >= 0, not by calling ``__len__`` (a Python frame
 * a feed a bar); anything else (the attribute missing, another value) calls ``__len__`` as
 * ``len()`` does, so the result is ``len()``'s whenever ``__len__`` returns the attribute. */
static PyTypeObject *g_counted_type = NULL;
static PyObject *g_counted_attr = NULL;
static PyObject *g_counted_len = NULL;  /* the class's __len__ (a function) when registered */
static PyObject *g_counted_code = NULL; /* and its __code__ then */
static PyObject *s___len__;

/* len(hashes), by the registered attribute when it may be (see g_counted_type); -1 on error. */
static Py_ssize_t
counted_length(PyObject *hashes)
{
    PyTypeObject *type = g_counted_type;
    if (type == NULL || Py_TYPE(hashes) != type) return PyObject_Length(hashes);
    PyObject *len = _PyType_Lookup(type, s___len__);
    if (len != g_counted_len || !PyFunction_Check(len) ||
        PyFunction_GET_CODE(len) != g_counted_code) {
        return PyObject_Length(hashes);
    }
    /* our own references: the attribute lookup may run Python code that registers again */
    PyObject *name = Py_NewRef(g_counted_attr);
    Py_INCREF(type);
    PyObject *v = PyObject_GetAttr(hashes, name);
    Py_DECREF(name);
    Py_DECREF(type);
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return PyObject_Length(hashes);
    }
    Py_ssize_t n = -1;
    if (PyLong_CheckExact(v)) {
        n = PyLong_AsSsize_t(v);
        if (n == -1 && PyErr_Occurred()) PyErr_Clear();
    }
    Py_DECREF(v);
    return n >= 0 ? n : PyObject_Length(hashes);
}

/* self.<name> from the instance dict (a new reference): for the classes this module serves
 * (proxies._dict_safe: none of these names is a data descriptor on the class, and attribute
 * lookup is object's own), an entry there is what ``self.<name>`` returns, and reading it has no
 * side effect. Not there: generic lookup (AttributeError, or the class's ``__getattr__``). */
static inline PyObject *
attr(PyObject *self, PyObject *dict, PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(dict, name);
    if (v != NULL) return Py_NewRef(v);
    if (PyErr_Occurred()) return NULL;
    return PyObject_GetAttr(self, name);
}

/* the instance dict (new reference), or NULL without an error when the class looks attributes
 * up in its own way (then the Python version runs instead) */
static inline PyObject *
instance_dict(PyObject *self)
{
    if (Py_TYPE(self)->tp_getattro != PyObject_GenericGetAttr) return NULL;
    PyObject *d = PyObject_GenericGetDict(self, NULL);
    if (d == NULL) PyErr_Clear();
    return d;
}

/* ACTIVE: 1 when it is True, 0 when False, 2 anything else or missing (the Python version
 * then decides: truth test, builtins), -1 on error */
static int
active_state(void)
{
    /* the answer is kept with the dict's version (CPython 3.11's ma_version_tag: a new value
     * from one global counter at every change of the dict), so the calls between two changes
     * of the module's globals (ACTIVE flips twice a bar) look nothing up */
    uint64_t version = ((PyDictObject *)g_globals)->ma_version_tag;
    if (version == g_active_version && version != 0) return g_active_state;
    PyObject *active = PyDict_GetItemWithError(g_globals, s_ACTIVE);
    int state;
    if (active == Py_True) state = 1;
    else if (active == Py_False) state = 0;
    else if (active == NULL && PyErr_Occurred()) return -1;
    else state = 2;
    /* the version read before the lookup: a lookup that ran code (a key of another type with
     * the same hash: its __eq__) and changed the dict leaves a version that no longer matches */
    g_active_version = version;
    g_active_state = state;
    return state;
}

/* ``pos + lencount - 1 - idx`` (``lencount - 1`` for a len()), evaluated as Python does:
 * C arithmetic for ints far from overflow, else the number protocol (floats, big ints,
 * numpy ints give what Python gives; a str raises the same TypeError) */
static inline int
bar_index_c(Py_ssize_t pos, PyObject *lencount, Py_ssize_t idx, int is_len, long long *out)
{
    /* 1 with *out when C arithmetic gives it exactly (an exact int lencount, every term far
     * from overflow), else 0 (no error set) */
    const long long lim = 1LL << 60;
    if (!PyLong_CheckExact(lencount)) return 0;
    int overflow = 0;
    long long lc = PyLong_AsLongLongAndOverflow(lencount, &overflow);
    if (!overflow && lc > -lim && lc < lim && pos > -lim && pos < lim && idx > -lim &&
        idx < lim) {
        *out = is_len ? lc - 1 : (long long)pos + lc - 1 - idx;
        return 1;
    }
    PyErr_Clear();
    return 0;
}

static PyObject *
bar_index(Py_ssize_t pos, PyObject *lencount, Py_ssize_t idx, int is_len)
{
    long long c_bar;
    if (bar_index_c(pos, lencount, idx, is_len, &c_bar)) return PyLong_FromLongLong(c_bar);
    if (is_len) return PyNumber_Subtract(lencount, k_one);
    PyObject *p = PyLong_FromSsize_t(pos);
    PyObject *a = p ? PyNumber_Add(p, lencount) : NULL;
    Py_XDECREF(p);
    PyObject *b = a ? PyNumber_Subtract(a, k_one) : NULL;
    Py_XDECREF(a);
    PyObject *i = b ? PyLong_FromSsize_t(idx) : NULL;
    PyObject *c = i ? PyNumber_Subtract(b, i) : NULL;
    Py_XDECREF(b);
    Py_XDECREF(i);
    return c;
}

/* ---------------------------------------------------------------------------------------------
 * ReadBuffer: one bar's raw reads, packed.
 *
 * Why: a list of 5-tuples costs, per read, a tuple and an int object on the bar loop, and on the
 * decision writer a pass turning them back into numbers (``unpack``); the tuples also load the
 * garbage collector (docs/benchmarks.md, eighteenth and nineteenth passes). Here a read is 41
 * bytes in C arrays: ``ints`` (tag id, ago, size, bar index: int64 each), ``vals`` (the value
 * when it is an exact float, else the position of an object in ``objs``) and ``kind``.
 *
 * Exactness: ints are packed only when they are exact ints fitting an int64, and the value is
 * packed only when it is an exact float (a new float of the same bits comes back: equal, NaN
 * and -0.0 included) or None. Any other value (str, bool, int, numpy scalar, float subclass) is
 * kept by reference in ``objs`` and comes back as that object; an appended object that is not
 * such a 5-tuple (a bool or a big int among the first four, a tuple subclass, another length)
 * is kept whole and comes back as itself (K_OBJECT).
 *
 * Thread context: the tracker's buffer is appended to and taken on the main thread only; a
 * taken buffer is never changed again, and is read by the decision writer: under the GIL, or
 * without it by ``resolve_buffers``, which pins the buffers it reads (``readers``; like a
 * bytearray's exports): appending to, clearing or taking from a pinned buffer raises
 * BufferError instead of moving the arrays being read. */

enum { K_FLOAT = 0, K_NONE = 1, K_VALUE = 2, K_OBJECT = 3 };

typedef union {
    double f;     /* K_FLOAT: the value */
    long long i;  /* K_VALUE, K_OBJECT: position in objs */
} slot_t;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n, cap;
    long long *ints;      /* (cap, 4): tag id, ago, size, bar index */
    slot_t *vals;         /* (cap,) */
    unsigned char *kind;  /* (cap,) */
    PyObject *objs;       /* list of the objects kept by reference (NULL: none yet) */
    Py_ssize_t whole;     /* how many K_OBJECT entries (unpack_buffers refuses those buffers) */
    Py_ssize_t readers;   /* resolve_buffers calls reading the arrays without the GIL */
} ReadBuffer;

static PyTypeObject ReadBufferType;

/* -1 with BufferError when resolve_buffers is reading ``rb`` without the GIL */
static int
rb_pinned(ReadBuffer *rb)
{
    if (rb->readers == 0) return 0;
    PyErr_SetString(PyExc_BufferError,
                    "ReadBuffer is being read by the decision writer: it cannot change now");
    return -1;
}

/* capacity for ``need`` reads; -1 with MemoryError. Arrays already grown stay grown when a
 * later one fails (cap only changes once all three are). */
static int
rb_reserve(ReadBuffer *rb, Py_ssize_t need)
{
    if (rb_pinned(rb) < 0) return -1;
    if (need <= rb->cap) return 0;
    Py_ssize_t cap = rb->cap < 64 ? 64 : rb->cap;
    while (cap < need) {
        if (cap > PY_SSIZE_T_MAX / 64) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    long long *ints = PyMem_Realloc(rb->ints, (size_t)cap * 4 * sizeof(long long));
    if (ints == NULL) goto nomem;
    rb->ints = ints;
    slot_t *vals = PyMem_Realloc(rb->vals, (size_t)cap * sizeof(slot_t));
    if (vals == NULL) goto nomem;
    rb->vals = vals;
    unsigned char *kind = PyMem_Realloc(rb->kind, (size_t)cap);
    if (kind == NULL) goto nomem;
    rb->kind = kind;
    rb->cap = cap;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* keep ``o`` in objs; its position, or -1 with an error */
static Py_ssize_t
rb_keep(ReadBuffer *rb, PyObject *o)
{
    if (rb->objs == NULL) {
        /* PyList_New may start a collection, whose finalizers may change this buffer (give
         * it a list of its own, clear it): looked at again after */
        PyObject *l = PyList_New(0);
        if (l == NULL) return -1;
        if (rb->objs == NULL) {
            rb->objs = l;
        }
        else {
            Py_DECREF(l); /* empty: no code runs */
        }
    }
    /* growing a list's item array is PyMem_Realloc: no collection, no Python code */
    if (PyList_Append(rb->objs, o) < 0) return -1;
    return PyList_GET_SIZE(rb->objs) - 1;
}

/* append a read of packed ints and any value (the hot path's append) */
static int
rb_push(ReadBuffer *rb, long long id, long long ago, long long size, long long bar,
        PyObject *value)
{
    /* Re-entrancy (helper-87): the only step here that can run Python code is rb_keep's list
     * allocation (a collection: finalizers, weakref callbacks, gc.callbacks, which may append
     * to, clear or take this buffer). It runs first; the slot is chosen and written after,
     * with nothing between that allocates a Python object (PyMem_Realloc never collects). */
    unsigned char k;
    slot_t v;
    if (rb_pinned(rb) < 0) return -1;
    if (PyFloat_CheckExact(value)) {
        k = K_FLOAT;
        v.f = PyFloat_AS_DOUBLE(value);
    }
    else if (value == Py_None) {
        k = K_NONE;
        v.f = 0.0;
    }
    else {
        Py_ssize_t at = rb_keep(rb, value);
        if (at < 0) return -1;
        k = K_VALUE;
        v.i = at;
    }
    if (rb_reserve(rb, rb->n + 1) < 0) return -1;
    Py_ssize_t i = rb->n;
    rb->kind[i] = k;
    rb->vals[i] = v;
    long long *p = rb->ints + 4 * i;
    p[0] = id;
    p[1] = ago;
    p[2] = size;
    p[3] = bar;
    rb->n = i + 1;
    return 0;
}

/* ``o`` as an int64 when it is an exact int that fits: 1, else 0 (no error set) */
static inline int
exact_int64(PyObject *o, long long *out)
{
    if (!PyLong_CheckExact(o)) return 0;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* append any object, as list.append would keep it: packed when it is a 5-tuple of four
 * int64-sized exact ints and a value, else kept whole */
static int
rb_append_obj(ReadBuffer *rb, PyObject *o)
{
    long long f[4];
    if (rb_pinned(rb) < 0) return -1;
    if (PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 5 &&
        exact_int64(PyTuple_GET_ITEM(o, 0), &f[0]) && exact_int64(PyTuple_GET_ITEM(o, 1), &f[1]) &&
        exact_int64(PyTuple_GET_ITEM(o, 2), &f[2]) && exact_int64(PyTuple_GET_ITEM(o, 3), &f[3])) {
        return rb_push(rb, f[0], f[1], f[2], f[3], PyTuple_GET_ITEM(o, 4));
    }
    Py_ssize_t at = rb_keep(rb, o); /* first: it may run Python code (see rb_push) */
    if (at < 0) return -1;
    if (rb_reserve(rb, rb->n + 1) < 0) return -1;
    Py_ssize_t i = rb->n;
    rb->kind[i] = K_OBJECT;
    rb->vals[i].i = at;
    memset(rb->ints + 4 * i, 0, 4 * sizeof(long long));
    rb->whole++;
    rb->n = i + 1;
    return 0;
}

/* read ``i`` (0 <= i < n) as the tuple appended: a new reference. Everything is copied out
 * of the buffer (and a kept object's reference taken) before the first allocation: an
 * allocation may collect, and a finalizer may then clear or refill this buffer (helper-87:
 * reads of freed arrays and a NULL objs) */
static PyObject *
rb_read(ReadBuffer *rb, Py_ssize_t i)
{
    unsigned char k = rb->kind[i];
    const long long *p = rb->ints + 4 * i;
    long long f[4] = {p[0], p[1], p[2], p[3]};
    double d = rb->vals[i].f;
    PyObject *obj = NULL;
    if (k == K_OBJECT || k == K_VALUE) {
        obj = Py_NewRef(PyList_GET_ITEM(rb->objs, (Py_ssize_t)rb->vals[i].i));
        if (k == K_OBJECT) return obj;
    }
    else if (k == K_NONE) {
        obj = Py_NewRef(Py_None);
    }
    /* from here on the buffer is not looked at */
    PyObject *t = PyTuple_New(5);
    if (t == NULL) {
        Py_XDECREF(obj);
        return NULL;
    }
    for (int j = 0; j < 4; j++) {
        PyObject *v = PyLong_FromLongLong(f[j]);
        if (v == NULL) {
            Py_DECREF(t);
            Py_XDECREF(obj);
            return NULL;
        }
        PyTuple_SET_ITEM(t, j, v);
    }
    if (k == K_FLOAT) {
        obj = PyFloat_FromDouble(d);
        if (obj == NULL) {
            Py_DECREF(t);
            return NULL;
        }
    }
    PyTuple_SET_ITEM(t, 4, obj);
    return t;
}

/* forget every read; a buffer that grew past 64K reads gives its memory back (as a list's
 * clear() would), a usual one keeps its arrays for the next bar */
static void
rb_reset(ReadBuffer *rb)
{
    rb->n = 0;
    rb->whole = 0;
    Py_CLEAR(rb->objs);
    if (rb->cap > 65536) {
        PyMem_Free(rb->ints);
        PyMem_Free(rb->vals);
        PyMem_Free(rb->kind);
        rb->ints = NULL;
        rb->vals = NULL;
        rb->kind = NULL;
        rb->cap = 0;
    }
}

static PyObject *
rb_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"reads", NULL};
    PyObject *init = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:ReadBuffer", kwlist, &init)) return NULL;
    ReadBuffer *rb = (ReadBuffer *)type->tp_alloc(type, 0);
    if (rb == NULL) return NULL;
    if (init != NULL) {
        PyObject *it = PyObject_GetIter(init);
        if (it == NULL) goto fail;
        PyObject *o;
        while ((o = PyIter_Next(it)) != NULL) {
            int rc = rb_append_obj(rb, o);
            Py_DECREF(o);
            if (rc < 0) {
                Py_DECREF(it);
                goto fail;
            }
        }
        Py_DECREF(it);
        if (PyErr_Occurred()) goto fail;
    }
    return (PyObject *)rb;
fail:
    Py_DECREF(rb);
    return NULL;
}

static int
rb_traverse(ReadBuffer *rb, visitproc visit, void *arg)
{
    Py_VISIT(rb->objs);
    return 0;
}

static int
rb_clear_refs(ReadBuffer *rb)
{
    /* the collector breaking a cycle through a kept value: the entries pointing into objs go
     * with it */
    rb->n = 0;
    rb->whole = 0;
    Py_CLEAR(rb->objs);
    return 0;
}

static void
rb_dealloc(ReadBuffer *rb)
{
    PyObject_GC_UnTrack(rb);
    Py_CLEAR(rb->objs);
    PyMem_Free(rb->ints);
    PyMem_Free(rb->vals);
    PyMem_Free(rb->kind);
    Py_TYPE(rb)->tp_free((PyObject *)rb);
}

static Py_ssize_t
rb_length(ReadBuffer *rb)
{
    return rb->n;
}

static PyObject *
rb_item(ReadBuffer *rb, Py_ssize_t i)
{
    if (i < 0 || i >= rb->n) {
        PyErr_SetString(PyExc_IndexError, "ReadBuffer index out of range");
        return NULL;
    }
    return rb_read(rb, i);
}

/* buf[i] (negative from the end) and buf[a:b:c] (a list of the reads, as a list's slice) */
static PyObject *
rb_subscript(ReadBuffer *rb, PyObject *key)
{
    if (PyIndex_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred()) return NULL;
        if (i < 0) i += rb->n;
        return rb_item(rb, i);
    }
    if (PySlice_Check(key)) {
        Py_ssize_t start, stop, step;
        if (PySlice_Unpack(key, &start, &stop, &step) < 0) return NULL;
        Py_ssize_t len = PySlice_AdjustIndices(rb->n, &start, &stop, step);
        PyObject *out = PyList_New(len);
        if (out == NULL) return NULL;
        for (Py_ssize_t k = 0; k < len; k++) {
            /* no index past the last one is computed (step may be PY_SSIZE_T_MAX) */
            Py_ssize_t i = start + k * step;
            if (i >= rb->n) {
                /* a finalizer run by an allocation here emptied the buffer (helper-87) */
                Py_DECREF(out);
                PyErr_SetString(PyExc_RuntimeError, "ReadBuffer changed size during slicing");
                return NULL;
            }
            PyObject *r = rb_read(rb, i);
            if (r == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(out, k, r);
        }
        return out;
    }
    PyErr_Format(PyExc_TypeError, "ReadBuffer indices must be integers or slices, not %.200s",
                 Py_TYPE(key)->tp_name);
    return NULL;
}

/* == and != as the list of its reads (with a list or another ReadBuffer) */
static PyObject *
rb_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) ||
        !(PyList_Check(b) || Py_IS_TYPE(b, &ReadBufferType) || PyList_Check(a) ||
          Py_IS_TYPE(a, &ReadBufferType))) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *la = Py_IS_TYPE(a, &ReadBufferType) ? PySequence_List(a) : Py_NewRef(a);
    PyObject *lb = la && Py_IS_TYPE(b, &ReadBufferType) ? PySequence_List(b)
                   : la                                   ? Py_NewRef(b)
                                                          : NULL;
    PyObject *res = lb ? PyObject_RichCompare(la, lb, op) : NULL;
    Py_XDECREF(la);
    Py_XDECREF(lb);
    return res;
}

static PyObject *
rb_repr(ReadBuffer *rb)
{
    PyObject *l = PySequence_List((PyObject *)rb);
    if (l == NULL) return NULL;
    PyObject *r = PyUnicode_FromFormat("ReadBuffer(%R)", l);
    Py_DECREF(l);
    return r;
}

static PyObject *
rb_append(ReadBuffer *rb, PyObject *o)
{
    if (rb_append_obj(rb, o) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
rb_clear(ReadBuffer *rb, PyObject *Py_UNUSED(ignored))
{
    if (rb_pinned(rb) < 0) return NULL;
    rb_reset(rb);
    Py_RETURN_NONE;
}

/* take(): the reads so far as a new ReadBuffer (exactly sized), and this one emptied: once a
 * bar on the main thread, instead of ``reads[:]`` and ``clear()`` (no tuple made) */
static PyObject *
rb_take(ReadBuffer *rb, PyObject *Py_UNUSED(ignored))
{
    if (rb_pinned(rb) < 0) return NULL;
    ReadBuffer *out = (ReadBuffer *)ReadBufferType.tp_alloc(&ReadBufferType, 0);
    if (out == NULL) return NULL;
    /* again: the allocation may have collected, and a finalizer that released the GIL let
     * another thread pin this buffer (helper-92: rb_reset then freed the arrays it read) */
    if (rb_pinned(rb) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    Py_ssize_t n = rb->n; /* read after the allocation, which may have run Python code */
    if (n > 0) {
        /* exactly n (a taken buffer never grows): bars of few reads wait in the writer's
         * queue, and rb_reserve's 64-read minimum made each ~2.7 KB (helper-87) */
        out->ints = PyMem_Malloc((size_t)n * 4 * sizeof(long long));
        out->vals = PyMem_Malloc((size_t)n * sizeof(slot_t));
        out->kind = PyMem_Malloc((size_t)n);
        if (out->ints == NULL || out->vals == NULL || out->kind == NULL) {
            Py_DECREF(out); /* rb_dealloc frees what was allocated */
            return PyErr_NoMemory();
        }
        out->cap = n;
        memcpy(out->ints, rb->ints, (size_t)n * 4 * sizeof(long long));
        memcpy(out->vals, rb->vals, (size_t)n * sizeof(slot_t));
        memcpy(out->kind, rb->kind, (size_t)n);
        out->n = n;
        out->whole = rb->whole;
        out->objs = rb->objs; /* positions in it stay valid: the list moves as it is */
        rb->objs = NULL;
    }
    rb_reset(rb);
    return (PyObject *)out;
}

/* sys.getsizeof: the object and its read arrays (not the kept objects, as a list's) */
static PyObject *
rb_sizeof(ReadBuffer *rb, PyObject *Py_UNUSED(ignored))
{
    size_t per = 4 * sizeof(long long) + sizeof(slot_t) + 1;
    return PyLong_FromSize_t((size_t)Py_TYPE(rb)->tp_basicsize + (size_t)rb->cap * per);
}

static PyObject *
rb_reduce(ReadBuffer *rb, PyObject *Py_UNUSED(ignored))
{
    PyObject *l = PySequence_List((PyObject *)rb);
    if (l == NULL) return NULL;
    return Py_BuildValue("(O(N))", (PyObject *)&ReadBufferType, l);
}

static PyMethodDef rb_methods[] = {
    {"append", (PyCFunction)rb_append, METH_O,
     "append(read): add a raw read (a 5-tuple, or any object: kept as it is)"},
    {"clear", (PyCFunction)rb_clear, METH_NOARGS, "clear(): forget every read"},
    {"take", (PyCFunction)rb_take, METH_NOARGS,
     "take() -> ReadBuffer: the reads so far (this buffer is emptied)"},
    {"__reduce__", (PyCFunction)rb_reduce, METH_NOARGS, "pickled as the list of its reads"},
    {"__sizeof__", (PyCFunction)rb_sizeof, METH_NOARGS, "bytes of the object and its arrays"},
    {NULL, NULL, 0, NULL}};

static PySequenceMethods rb_as_sequence = {
    .sq_length = (lenfunc)rb_length,
    .sq_item = (ssizeargfunc)rb_item, /* iter() walks it (PySeqIter) */
};

static PyMappingMethods rb_as_mapping = {
    .mp_length = (lenfunc)rb_length,
    .mp_subscript = (binaryfunc)rb_subscript,
};

static PyTypeObject ReadBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "analyzers.tracking._fastread.ReadBuffer",
    .tp_doc = PyDoc_STR("ReadBuffer(reads=()): one bar's raw reads, packed; a list of 5-tuples "
                        "to Python (append, len, iteration, indexing, slicing, ==)"),
    .tp_basicsize = sizeof(ReadBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_SEQUENCE,
    .tp_new = rb_new,
    .tp_dealloc = (destructor)rb_dealloc,
    .tp_traverse = (traverseproc)rb_traverse,
    .tp_clear = (inquiry)rb_clear_refs,
    .tp_repr = (reprfunc)rb_repr,
    .tp_richcompare = rb_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_as_sequence = &rb_as_sequence,
    .tp_as_mapping = &rb_as_mapping,
    .tp_methods = rb_methods,
};

/* The recording part, in Python's order of evaluation:
 *   tag = self._fmel; tag.out.append((tag.id, ago, size, <bar_index>, value))
 *   and for a value read: if tag.strict: tag.tracker.check_strict()
 * ``ago`` is ``ago_c`` as an exact int (a key the caller checked), ``size`` 0 or 1. Into a
 * ReadBuffer the read goes as C numbers when every number is an int64 computed in C (no
 * tuple, no int object: the common read), else as the tuple Python would append. */
static int
record(PyObject *self, PyObject *dict, PyObject *ago, Py_ssize_t ago_c, PyObject *size,
       Py_ssize_t pos, Py_ssize_t idx, PyObject *value, int is_len)
{
    PyObject *tag = attr(self, dict, s__fmel);
    if (tag == NULL) return -1;
    PyObject *id = NULL, *lencount = NULL, *bar = NULL, *t = NULL, *append = NULL;
    int rc = -1;
    PyObject *out = PyObject_GetAttr(tag, s_out);
    if (out == NULL) goto done;
    int packed = Py_IS_TYPE(out, &ReadBufferType);
    if (!packed && !PyList_CheckExact(out) && (append = PyObject_GetAttr(out, s_append)) == NULL)
        goto done;
    if ((id = PyObject_GetAttr(tag, s_id)) == NULL) goto done;
    if ((lencount = attr(self, dict, s_lencount)) == NULL) goto done;
    if (packed) {
        long long id_c, bar_c;
        if (exact_int64(id, &id_c) && bar_index_c(pos, lencount, idx, is_len, &bar_c)) {
            rc = rb_push((ReadBuffer *)out, id_c, ago_c, size == k_one ? 1 : 0, bar_c, value);
            goto strict;
        }
    }
    if ((bar = bar_index(pos, lencount, idx, is_len)) == NULL) goto done;
    if ((t = PyTuple_New(5)) == NULL) goto done;
    PyTuple_SET_ITEM(t, 0, Py_NewRef(id));
    PyTuple_SET_ITEM(t, 1, Py_NewRef(ago));
    PyTuple_SET_ITEM(t, 2, Py_NewRef(size));
    PyTuple_SET_ITEM(t, 3, Py_NewRef(bar));
    PyTuple_SET_ITEM(t, 4, Py_NewRef(value));
    if (PyLong_CheckExact(id) && PyLong_CheckExact(ago) && PyLong_CheckExact(bar) &&
        (PyFloat_CheckExact(value) || value == Py_None)) {
        /* numbers only (size is an int too): it can never be part of a cycle, so the
         * collector need not walk it (it would untrack it at its first pass anyway,
         * _PyTuple_MaybeUntrack, after walking it once) */
        PyObject_GC_UnTrack(t);
    }
    if (packed) {
        rc = rb_append_obj((ReadBuffer *)out, t);
    }
    else if (append == NULL) {
        rc = PyList_Append(out, t);
    }
    else {
        PyObject *res = PyObject_CallOneArg(append, t);
        rc = res ? 0 : -1;
        Py_XDECREF(res);
    }
strict:
    if (rc == 0 && !is_len) {
        PyObject *strict = PyObject_GetAttr(tag, s_strict);
        int st = strict ? PyObject_IsTrue(strict) : -1;
        Py_XDECREF(strict);
        if (st < 0) {
            rc = -1;
        }
        else if (st) {
            PyObject *tracker = PyObject_GetAttr(tag, s_tracker);
            PyObject *res = tracker ? PyObject_CallMethodNoArgs(tracker, s_check_strict) : NULL;
            Py_XDECREF(tracker);
            rc = res ? 0 : -1;
            Py_XDECREF(res);
        }
    }
done:
    Py_XDECREF(t);
    Py_XDECREF(bar);
    Py_XDECREF(lencount);
    Py_XDECREF(id);
    Py_XDECREF(append);
    Py_XDECREF(out);
    Py_DECREF(tag);
    return rc;
}

/* a buffer whose C sq_item indexes as Python does (not a Python class: its __getitem__ would
 * get the index with len() already added) */
static int
fast_type(PyObject *arr)
{
    Py_ssize_t n = PyTuple_GET_SIZE(g_fast_types);
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((PyObject *)Py_TYPE(arr) == PyTuple_GET_ITEM(g_fast_types, i)) return 1;
    }
    return 0;
}

/* func(self, *args, **kwargs) from a vectorcall's arguments */
static PyObject *
delegate(PyObject *func, PyObject *self, PyObject *const *args, size_t nargsf,
         PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *small[8];
    PyObject **stack = small;
    if (nargs + nkw + 1 > 8) {
        stack = PyMem_Malloc((nargs + nkw + 1) * sizeof(PyObject *));
        if (stack == NULL) return PyErr_NoMemory();
    }
    stack[0] = self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++) stack[i + 1] = args[i];
    PyObject *res = PyObject_Vectorcall(func, stack, nargs + 1, kwnames);
    if (stack != small) PyMem_Free(stack);
    return res;
}

/* the tail of _plain_getitem, once the value is read (proxies._plain_tail) */
static PyObject *
tail(PyObject *self, PyObject *key, PyObject *value)
{
    PyObject *args[3] = {self, key, value};
    return PyObject_Vectorcall(g_tail, args, 3, NULL);
}

static PyObject *
tracked_getitem(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames != NULL || PyVectorcall_NARGS(nargsf) != 1 || !PyLong_CheckExact(args[0])) {
        return delegate(g_fallback, self, args, nargsf, kwnames);
    }
    PyObject *key = args[0];
    Py_ssize_t ago = PyLong_AsSsize_t(key);
    if (ago == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return delegate(g_fallback, self, args, nargsf, NULL);
    }
    PyObject *dict = instance_dict(self);
    if (dict == NULL) return delegate(g_fallback, self, args, nargsf, NULL);
    /* value = self.array[self._idx + ago]: anything unusual goes to Python, which reads the
     * same entries again. References are held from the lookup on: a dict holding a key that
     * is not a str can run its __eq__ during a lookup, and that code may change the dict. */
    PyObject *arr = PyDict_GetItemWithError(dict, s_array);
    Py_XINCREF(arr);
    PyObject *idxo = arr ? PyDict_GetItemWithError(dict, s__idx) : NULL;
    Py_XINCREF(idxo);
    Py_ssize_t idx = (idxo && PyLong_CheckExact(idxo)) ? PyLong_AsSsize_t(idxo) : -1;
    int odd = idxo == NULL || !PyLong_CheckExact(idxo) || (idx == -1 && PyErr_Occurred()) ||
              (ago > 0 && idx > PY_SSIZE_T_MAX - ago) ||
              (ago < 0 && idx < PY_SSIZE_T_MIN - ago) || !fast_type(arr);
    Py_XDECREF(idxo);
    if (odd) {
        PyErr_Clear();
        Py_XDECREF(arr);
        Py_DECREF(dict);
        return delegate(g_fallback, self, args, nargsf, NULL);
    }
    Py_ssize_t pos = idx + ago;
    PyObject *value = PySequence_GetItem(arr, pos); /* negative: + len, as Python indexing */
    if (value == NULL) goto fail;
    int state = active_state();
    if (state == 2) {
        Py_DECREF(arr);
        Py_DECREF(dict);
        PyObject *res = tail(self, key, value);
        Py_DECREF(value);
        return res;
    }
    if (state < 0) goto fail;
    if (state == 1) {
        if (pos < 0) {
            Py_ssize_t n = PyObject_Length(arr);
            if (n < 0) goto fail;
            pos += n;
        }
        if (record(self, dict, key, ago, k_one, pos, idx, value, 0) < 0) goto fail;
    }
    else if (ago > 0) {
        /* self._fmel.tracker.internal_future_read(self, ago, depth=1): the reader is the
         * caller's frame (this function has none; the Python version passes 2) */
        PyObject *tag = attr(self, dict, s__fmel);
        PyObject *tracker = tag ? PyObject_GetAttr(tag, s_tracker) : NULL;
        Py_XDECREF(tag);
        PyObject *res = tracker ? PyObject_CallMethodObjArgs(
                                      tracker, s_internal_future_read, self, key, k_one, NULL)
                                : NULL;
        Py_XDECREF(tracker);
        if (res == NULL) goto fail;
        Py_DECREF(res);
    }
    Py_DECREF(dict);
    Py_DECREF(arr);
    return value;
fail:
    Py_DECREF(dict);
    Py_DECREF(arr);
    Py_XDECREF(value);
    return NULL;
}

static PyObject *
tracked_len(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames != NULL || PyVectorcall_NARGS(nargsf) != 0) {
        return delegate(g_len_fallback, self, args, nargsf, kwnames);
    }
    int state = active_state();
    if (state < 0) return NULL;
    PyObject *dict = state == 2 ? NULL : instance_dict(self);
    if (dict == NULL) return delegate(g_len_fallback, self, args, nargsf, NULL);
    if (state == 1 && record(self, dict, k_zero, 0, k_zero, 0, 0, Py_None, 1) < 0) {
        Py_DECREF(dict);
        return NULL;
    }
    PyObject *lencount = attr(self, dict, s_lencount); /* return self.lencount */
    Py_DECREF(dict);
    return lencount;
}

#define GETITEM_DOC "x.__getitem__(ago): the value ``ago`` bars back, recorded while ACTIVE."
#define LEN_DOC "len(x), recorded as a read of the whole line (size 0) while ACTIVE."
static PyMethodDef getitem_def = {"__getitem__",
                                  (PyCFunction)(void (*)(void))tracked_getitem,
                                  METH_FASTCALL | METH_KEYWORDS, GETITEM_DOC};
static PyMethodDef len_def = {"__len__", (PyCFunction)(void (*)(void))tracked_len,
                              METH_FASTCALL | METH_KEYWORDS, LEN_DOC};

static PyObject *
make_descriptors(PyObject *Py_UNUSED(mod), PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "descriptors() needs a class");
        return NULL;
    }
    PyObject *g = PyDescr_NewMethod((PyTypeObject *)cls, &getitem_def);
    PyObject *n = g ? PyDescr_NewMethod((PyTypeObject *)cls, &len_def) : NULL;
    if (n == NULL) {
        Py_XDECREF(g);
        return NULL;
    }
    return Py_BuildValue("(NN)", g, n);
}

static PyObject *
init(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *g, *f, *t, *lf, *types;
    if (!PyArg_ParseTuple(args, "O!OOOO!:init", &PyDict_Type, &g, &f, &t, &lf, &PyTuple_Type,
                          &types))
        return NULL;
    /* the caller passes C types whose sq_item indexes as their subscript does */
    Py_XSETREF(g_fast_types, Py_NewRef(types));
    Py_XSETREF(g_globals, Py_NewRef(g));
    g_active_version = 0;
    Py_XSETREF(g_fallback, Py_NewRef(f));
    Py_XSETREF(g_tail, Py_NewRef(t));
    Py_XSETREF(g_len_fallback, Py_NewRef(lf));
    Py_RETURN_NONE;
}

/* the three column buffers of ``n`` reads (uninitialised bytes objects: int64 (n, 4),
 * float64 (n,), bool (n,)); 0, or -1 with an error and nothing left allocated. Bytes objects
 * are not tracked by the collector: allocating them runs no Python code. */
static int
column_bytes(Py_ssize_t n, PyObject **ints, PyObject **vals, PyObject **isf)
{
    *ints = PyBytes_FromStringAndSize(NULL, n * 4 * (Py_ssize_t)sizeof(long long));
    *vals = *ints ? PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(double)) : NULL;
    *isf = *vals ? PyBytes_FromStringAndSize(NULL, n) : NULL;
    if (*isf == NULL) {
        Py_XDECREF(*ints);
        Py_XDECREF(*vals);
        return -1;
    }
    return 0;
}

/* unpack(reads) -> (ints, values, is_float): the raw reads of a batch (a list of 5-tuples,
 * as the tracked classes append them) as columns, in one pass: ``ints`` the bytes of an int64
 * (n, 4) array (tag id, ago, size, bar index), ``values`` those of a float64 (n,) array (the
 * value when it is exactly a float, else 0.0), ``is_float`` those of a bool (n,) array.
 * Only exact tuples of exact ints (what the tracked classes append): anything else raises
 * TypeError, an int beyond int64 OverflowError, and the caller then lets numpy convert (its
 * rules: ``__int__`` for other objects). Any thread, under the GIL (the decision writer's). */
static PyObject *
unpack(PyObject *Py_UNUSED(mod), PyObject *reads)
{
    if (!PyList_CheckExact(reads)) {
        PyErr_SetString(PyExc_TypeError, "unpack() needs a list of raw reads");
        return NULL;
    }
    /* a copy holds every read: no code runs here (exact types only), but the copy makes sure */
    PyObject *copy = PyList_AsTuple(reads);
    if (copy == NULL) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(copy);
    PyObject *ints, *vals, *isf;
    if (column_bytes(n, &ints, &vals, &isf) < 0) {
        Py_DECREF(copy);
        return NULL;
    }
    long long *ip = (long long *)PyBytes_AS_STRING(ints);
    double *vp = (double *)PyBytes_AS_STRING(vals);
    char *fp = PyBytes_AS_STRING(isf);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(copy, i);
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 5) {
            PyErr_Format(PyExc_TypeError, "raw read %zd is not a 5-tuple", i);
            goto fail;
        }
        for (int k = 0; k < 4; k++) {
            PyObject *o = PyTuple_GET_ITEM(t, k);
            if (!PyLong_CheckExact(o)) { /* bools, numpy ints...: numpy's conversion decides */
                PyErr_Format(PyExc_TypeError, "raw read %zd: field %d is not an int", i, k);
                goto fail;
            }
            long long v = PyLong_AsLongLong(o);
            if (v == -1 && PyErr_Occurred()) goto fail;
            ip[4 * i + k] = v;
        }
        PyObject *value = PyTuple_GET_ITEM(t, 4);
        if (PyFloat_CheckExact(value)) {
            vp[i] = PyFloat_AS_DOUBLE(value);
            fp[i] = 1;
        }
        else {
            vp[i] = 0.0;
            fp[i] = 0;
        }
    }
    Py_DECREF(copy);
    return Py_BuildValue("(NNN)", ints, vals, isf);
fail:
    Py_DECREF(copy);
    Py_DECREF(ints);
    Py_DECREF(vals);
    Py_DECREF(isf);
    return NULL;
}

/* unpack_buffers(buffers) -> (ints, values, is_float): ``unpack`` of the reads of several
 * ReadBuffers one after the other (a batch's bars), from their arrays (no tuple made): the same
 * bytes ``unpack`` gives for the same reads as tuples. TypeError when an entry is not a
 * ReadBuffer or holds a read kept whole (not packed: the caller then unpacks the tuples, which
 * decides as without the extension). Any thread, under the GIL (the decision writer's). */
static PyObject *
unpack_buffers(PyObject *Py_UNUSED(mod), PyObject *buffers)
{
    if (!PyList_CheckExact(buffers)) {
        PyErr_SetString(PyExc_TypeError, "unpack_buffers() needs a list of ReadBuffers");
        return NULL;
    }
    PyObject *copy = PyList_AsTuple(buffers); /* holds every buffer while they are read */
    if (copy == NULL) return NULL;
    Py_ssize_t nb = PyTuple_GET_SIZE(copy), n = 0;
    for (Py_ssize_t b = 0; b < nb; b++) {
        PyObject *o = PyTuple_GET_ITEM(copy, b);
        if (!Py_IS_TYPE(o, &ReadBufferType)) {
            PyErr_Format(PyExc_TypeError, "unpack_buffers(): entry %zd is not a ReadBuffer", b);
            Py_DECREF(copy);
            return NULL;
        }
        ReadBuffer *rb = (ReadBuffer *)o;
        if (rb->whole) {
            PyErr_Format(PyExc_TypeError, "unpack_buffers(): entry %zd holds a read not packed",
                         b);
            Py_DECREF(copy);
            return NULL;
        }
        n += rb->n;
    }
    PyObject *ints, *vals, *isf;
    if (column_bytes(n, &ints, &vals, &isf) < 0) {
        Py_DECREF(copy);
        return NULL;
    }
    long long *ip = (long long *)PyBytes_AS_STRING(ints);
    double *vp = (double *)PyBytes_AS_STRING(vals);
    char *fp = PyBytes_AS_STRING(isf);
    Py_ssize_t room = n;
    for (Py_ssize_t b = 0; b < nb; b++) {
        ReadBuffer *rb = (ReadBuffer *)PyTuple_GET_ITEM(copy, b);
        Py_ssize_t m = rb->n;
        if (m == 0) continue;
        if (m > room || rb->whole) {
            /* cannot happen (bytes objects are not collected: no Python code ran since the
             * count), checked all the same: never a write past the arrays */
            PyErr_SetString(PyExc_RuntimeError, "unpack_buffers(): a buffer changed");
            Py_DECREF(ints);
            Py_DECREF(vals);
            Py_DECREF(isf);
            Py_DECREF(copy);
            return NULL;
        }
        room -= m;
        memcpy(ip, rb->ints, (size_t)m * 4 * sizeof(long long));
        for (Py_ssize_t i = 0; i < m; i++) {
            int is_f = rb->kind[i] == K_FLOAT;
            vp[i] = is_f ? rb->vals[i].f : 0.0;
            fp[i] = (char)is_f;
        }
        ip += 4 * m;
        vp += m;
        fp += m;
    }
    Py_DECREF(copy);
    return Py_BuildValue("(NNN)", ints, vals, isf);
}

/* One feed's position as capture() evaluates it: ``dt.lencount``, ``dt._idx``, ``len(dt.array)``,
 * ``dt.extension``, then ``len(hashes)`` (0 for None), in that order with the generic protocols
 * (attribute lookup, len()). ``held`` is ``len(array) - extension``: computed in C into
 * ``held_c`` when ``extension`` is an exact int and the difference fits an int64 (what
 * PyNumber_Subtract gives then), else by PyNumber_Subtract into ``held`` (errors included).
 * 0 with ``lc``, ``idx`` (and ``held`` when not NULL) owned by the caller; -1 with an error and
 * nothing owned. */
typedef struct {
    PyObject *lc, *idx, *held;
    long long held_c;
    Py_ssize_t known;
} CaptureRow;

static int
capture_row(PyObject *pair, Py_ssize_t i, CaptureRow *row)
{
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_Format(PyExc_TypeError, "capture(): entry %zd is not a (line, hashes) pair", i);
        return -1;
    }
    PyObject *dt = PyTuple_GET_ITEM(pair, 0), *hashes = PyTuple_GET_ITEM(pair, 1);
    PyObject *lc = NULL, *idx = NULL, *arr = NULL, *nb = NULL, *ext = NULL, *held = NULL;
    Py_ssize_t len;
    long long e;
    row->held_c = 0;
    if ((lc = PyObject_GetAttr(dt, s_lencount)) == NULL) goto fail;
    if ((idx = PyObject_GetAttr(dt, s__idx)) == NULL) goto fail;
    if ((arr = PyObject_GetAttr(dt, s_array)) == NULL) goto fail;
    if ((len = PyObject_Length(arr)) < 0) goto fail;
    Py_CLEAR(arr);
    if ((ext = PyObject_GetAttr(dt, s_extension)) == NULL) goto fail;
    if (exact_int64(ext, &e) && !__builtin_sub_overflow((long long)len, e, &row->held_c)) {
        held = NULL; /* an int minus an exact int: the same number PyNumber_Subtract gives */
    }
    else {
        if ((nb = PyLong_FromSsize_t(len)) == NULL) goto fail;
        if ((held = PyNumber_Subtract(nb, ext)) == NULL) goto fail;
        Py_CLEAR(nb);
    }
    Py_CLEAR(ext);
    if (hashes == Py_None) {
        row->known = 0;
    }
    else if ((row->known = counted_length(hashes)) < 0) {
        goto fail;
    }
    row->lc = lc;
    row->idx = idx;
    row->held = held;
    return 0;
fail:
    Py_XDECREF(lc);
    Py_XDECREF(idx);
    Py_XDECREF(arr);
    Py_XDECREF(nb);
    Py_XDECREF(ext);
    Py_XDECREF(held);
    return -1;
}

/* ``row`` as capture()'s 4-tuple (the row's references are left to the caller) */
static PyObject *
row_tuple(CaptureRow *row)
{
    PyObject *held = row->held ? Py_NewRef(row->held) : PyLong_FromLongLong(row->held_c);
    PyObject *known = held ? PyLong_FromSsize_t(row->known) : NULL;
    PyObject *t = known ? PyTuple_Pack(4, row->lc, row->idx, held, known) : NULL;
    Py_XDECREF(held);
    Py_XDECREF(known);
    return t;
}

/* The packed rows ``p[0 .. n)`` as capture()'s tuples, into ``out[0 .. n)`` */
static int
unpacked_rows(const long long *p, Py_ssize_t n, PyObject *out)
{
    for (Py_ssize_t i = 0; i < n; i++, p += 4) {
        PyObject *t = Py_BuildValue("(LLLL)", p[0], p[1], p[2], p[3]);
        if (t == NULL) return -1;
        PyTuple_SET_ITEM(out, i, t);
    }
    return 0;
}

/* capture(captured) -> AccessTracker.capture_py()'s tuple: for each (datetime line, hashes)
 * pair of ``captured``, ``(dt.lencount, dt._idx, len(dt.array) - dt.extension, len(hashes) if
 * hashes is not None else 0)``, evaluated in that order with the generic protocols (attribute
 * lookup, len(), subtraction: what the Python expression does, errors included). Once a bar,
 * main thread; the list is copied first (a __len__ written in Python may run).
 *
 * capture_packed(captured): the same evaluation, each attribute read once; the same numbers as
 * one bytes object of int64 ``(feeds, 4)`` (native order) when every one is an exact int that
 * fits, else capture()'s tuple. 32 bytes a feed instead of a tuple of four ints (~112 bytes),
 * kept from the bar until the writer resolves it. */
static PyObject *
capture_impl(PyObject *captured, int packed)
{
    if (!PyList_CheckExact(captured)) {
        PyErr_SetString(PyExc_TypeError, "capture() needs a list of (line, hashes) pairs");
        return NULL;
    }
    PyObject *copy = PyList_AsTuple(captured);
    if (copy == NULL) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(copy);
    PyObject *bytes = NULL, *out = NULL;
    long long *p = NULL;
    if (packed) {
        if ((bytes = PyBytes_FromStringAndSize(NULL, n * 4 * (Py_ssize_t)sizeof(long long))) ==
            NULL)
            goto fail;
        p = (long long *)PyBytes_AS_STRING(bytes);
    }
    else if ((out = PyTuple_New(n)) == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        CaptureRow row;
        if (capture_row(PyTuple_GET_ITEM(copy, i), i, &row) < 0) goto fail;
        if (bytes != NULL) {
            long long *q = p + 4 * i;
            /* held: computed in C, or PyNumber_Subtract's result when that is a plain int64
             * (an extension of True, an int subclass, or past int64 with a difference that
             * fits: helper-99) */
            int held_ok = row.held == NULL ? (q[2] = row.held_c, 1) : exact_int64(row.held, &q[2]);
            if (held_ok && exact_int64(row.lc, &q[0]) && exact_int64(row.idx, &q[1])) {
                q[3] = (long long)row.known;
                Py_DECREF(row.lc);
                Py_DECREF(row.idx);
                Py_XDECREF(row.held);
                continue;
            }
            /* a number that is not a plain int64: the tuples from here on, the rows packed so
             * far made into tuples of the same ints */
            if ((out = PyTuple_New(n)) == NULL || unpacked_rows(p, i, out) < 0) {
                Py_DECREF(row.lc);
                Py_DECREF(row.idx);
                Py_XDECREF(row.held);
                goto fail;
            }
            Py_CLEAR(bytes);
        }
        PyObject *t = row_tuple(&row);
        Py_DECREF(row.lc);
        Py_DECREF(row.idx);
        Py_XDECREF(row.held);
        if (t == NULL) goto fail;
        PyTuple_SET_ITEM(out, i, t);
    }
    Py_DECREF(copy);
    return bytes != NULL ? bytes : out;
fail:
    Py_DECREF(copy);
    Py_XDECREF(bytes);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *
capture(PyObject *Py_UNUSED(mod), PyObject *captured)
{
    return capture_impl(captured, 0);
}

static PyObject *
capture_packed(PyObject *Py_UNUSED(mod), PyObject *captured)
{
    return capture_impl(captured, 1);
}

/* count_by_attribute(cls, name) -> None: see g_counted_type. One class at a time (a later call
 * replaces it); the class must define __len__ itself. */
static PyObject *
count_by_attribute(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *cls, *name;
    if (!PyArg_ParseTuple(args, "O!U:count_by_attribute", &PyType_Type, &cls, &name)) return NULL;
    PyObject *len = _PyType_Lookup((PyTypeObject *)cls, s___len__);
    if (len == NULL || !PyFunction_Check(len)) {
        PyErr_Format(PyExc_TypeError,
                     "count_by_attribute(): %R has no __len__ written in Python (found %R)", cls,
                     len == NULL ? Py_None : len);
        return NULL;
    }
    Py_XSETREF(g_counted_code, Py_NewRef(PyFunction_GET_CODE(len)));
    Py_XSETREF(g_counted_len, Py_NewRef(len));
    Py_XSETREF(g_counted_attr, Py_NewRef(name));
    Py_XSETREF(g_counted_type, (PyTypeObject *)Py_NewRef(cls));
    Py_RETURN_NONE;
}

/* The bars' captured feed positions (AccessTracker.capture(): a tuple of (count, array index,
 * held, known) per feed, or those numbers packed by capture_packed) as one (bars, n_slots, 4) int64 array, zeros past a bar's own feeds
 * (as columns._states). NULL with TypeError for anything else (the caller's numpy path
 * decides then). */
static int64_t *
states_array(PyObject *states, Py_ssize_t n_slots)
{
    Py_ssize_t n = PyTuple_GET_SIZE(states);
    int64_t *out = PyMem_Calloc((size_t)(n > 0 ? n : 1) * (size_t)n_slots * 4, sizeof(int64_t));
    if (out == NULL) return (int64_t *)PyErr_NoMemory();
    for (Py_ssize_t b = 0; b < n; b++) {
        PyObject *st = PyTuple_GET_ITEM(states, b);
        if (PyBytes_CheckExact(st)) { /* capture_packed's: int64 (feeds, 4) */
            Py_ssize_t size = PyBytes_GET_SIZE(st), row = 4 * (Py_ssize_t)sizeof(int64_t);
            if (size % row != 0 || size / row > n_slots) goto bad;
            memcpy(out + b * n_slots * 4, PyBytes_AS_STRING(st), (size_t)size);
            continue;
        }
        if (!PyTuple_CheckExact(st) || PyTuple_GET_SIZE(st) > n_slots) goto bad;
        for (Py_ssize_t s = 0; s < PyTuple_GET_SIZE(st); s++) {
            PyObject *row = PyTuple_GET_ITEM(st, s);
            if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != 4) goto bad;
            for (int k = 0; k < 4; k++) {
                long long v;
                if (!exact_int64(PyTuple_GET_ITEM(row, k), &v)) goto bad;
                out[(b * n_slots + s) * 4 + k] = v;
            }
        }
    }
    return out;
bad:
    PyMem_Free(out);
    PyErr_SetString(PyExc_TypeError, "resolve_buffers(): a bar's captured positions are not "
                                     "at most n_slots tuples of 4 int64-sized ints (or "
                                     "their int64 bytes)");
    return NULL;
}

/* resolve_buffers(buffers, states, n_slots, src, len_src, field_code_of_tag, sym_of_slot,
 * n_syms, n_fields): _resolve.c's fr_resolve over the bars' ReadBuffers, read in place, and
 * their captured positions. Each buffer is pinned (``readers``) and referenced while the GIL is
 * released; a buffer holding a read kept whole (K_OBJECT), anything not a ReadBuffer, or
 * positions not as capture() gives them are refused with TypeError (the caller then unpacks
 * the reads as tuples and uses numpy). */
static PyObject *
resolve_buffers(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *buffers, *states, *src, *len_src, *fcode, *sym;
    Py_ssize_t n_slots, n_syms, n_fields;
    if (!PyArg_ParseTuple(args, "O!O!nOOOOnn:resolve_buffers", &PyList_Type, &buffers,
                          &PyList_Type, &states, &n_slots, &src, &len_src, &fcode, &sym,
                          &n_syms, &n_fields))
        return NULL;
    if (n_slots < 1 || PyList_GET_SIZE(states) != PyList_GET_SIZE(buffers) ||
        n_slots > PY_SSIZE_T_MAX / 64 / (PyList_GET_SIZE(buffers) + 1)) {
        PyErr_SetString(PyExc_ValueError,
                        "resolve_buffers(): one captured state a bar, and n_slots >= 1 (and "
                        "bars x n_slots x 4 int64 within memory)");
        return NULL;
    }
    /* our own references: the lists may change while the GIL is released */
    PyObject *bars = PyList_AsTuple(buffers);
    if (bars == NULL) return NULL;
    PyObject *st = PyList_AsTuple(states);
    if (st == NULL) {
        Py_DECREF(bars);
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(bars);
    PyObject *out = NULL;
    int64_t *state = NULL;
    ReadChunk *chunks = NULL;
    if (PyTuple_GET_SIZE(st) != n) {
        PyErr_SetString(PyExc_ValueError, "resolve_buffers(): one captured state a bar");
        goto done;
    }
    chunks = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(ReadChunk));
    if (chunks == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(bars, i);
        if (!Py_IS_TYPE(o, &ReadBufferType) || ((ReadBuffer *)o)->whole) {
            PyErr_Format(PyExc_TypeError,
                         "resolve_buffers(): bar %zd is not a ReadBuffer of packed reads", i);
            goto done;
        }
    }
    if ((state = states_array(st, n_slots)) == NULL) goto done;
    /* read the buffers' fields only now: nothing after this runs Python code */
    for (Py_ssize_t i = 0; i < n; i++) {
        ReadBuffer *rb = (ReadBuffer *)PyTuple_GET_ITEM(bars, i);
        chunks[i].ints = (const int64_t *)rb->ints;
        chunks[i].vals = (const double *)rb->vals; /* .f of each slot_t */
        chunks[i].flag = rb->kind;
        chunks[i].n = rb->n;
        rb->readers++;
    }
    out = fr_resolve(chunks, n, K_FLOAT, state, n_slots, src, len_src, fcode, sym, n_syms,
                     n_fields);
    for (Py_ssize_t i = 0; i < n; i++) ((ReadBuffer *)PyTuple_GET_ITEM(bars, i))->readers--;
done:
    PyMem_Free(chunks);
    PyMem_Free(state);
    Py_DECREF(st);
    Py_DECREF(bars);
    return out;
}

static PyMethodDef methods[] = {
    {"count_by_attribute", count_by_attribute, METH_VARARGS,
     "count_by_attribute(cls, name): in capture(), len() of an object of exactly cls (whose "
     "class __len__ is still the Python function it had here, with the same code) is its "
     "attribute name when that is an int >= 0, read without calling __len__; otherwise "
     "__len__ is called. The caller vouches that __len__ returns that attribute."},
    {"capture", capture, METH_O,
     "capture(captured) -> AccessTracker.capture_py(): (lencount, _idx, len(array) - extension, "
     "len(hashes) or 0) per (datetime line, hashes) pair"},
    {"capture_packed", capture_packed, METH_O,
     "capture_packed(captured) -> the same numbers as int64 bytes (feeds, 4) when each is an "
     "int that fits, else capture()'s tuple"},
    {"unpack", unpack, METH_O,
     "unpack(reads) -> (ints, values, is_float) bytes of int64 (n, 4), float64 (n,), bool (n,)"},
    {"unpack_buffers", unpack_buffers, METH_O,
     "unpack_buffers(buffers) -> unpack() of the reads of a list of ReadBuffers, in order"},
    {"resolve_buffers", resolve_buffers, METH_VARARGS,
     "resolve_buffers(buffers, states, n_slots, src, len_src, field_code_of_tag, sym_of_slot, "
     "n_syms, n_fields) -> columns._kernel_np()'s arrays (as bytes) for the reads of a list "
     "of ReadBuffers and the feeds' positions captured at each bar; None when none resolves, "
     "NotImplemented when numpy must (see _resolve.c). The GIL is released while it "
     "computes"},
    {"descriptors", make_descriptors, METH_O,
     "descriptors(cls) -> (__getitem__, __len__) method descriptors for instances of cls (a "
     "class proxies._dict_safe accepts)"},
    {"record_bar", (PyCFunction)(void (*)(void))fr_record_bar, METH_FASTCALL,
     "record_bar(analyzer, stage): FMELAnalyzer._record for the usual bar, in one call; "
     "any other bar goes to analyzer._record_py(stage) (see _record.c)"},
    {"record_init", fr_record_init, METH_VARARGS,
     "record_init(fmel_globals, ind_key, ReadBuffer, AccessTracker, FMELAnalyzer, "
     "instance_reads): what record_bar builds with"},
    {"init", init, METH_VARARGS,
     "init(proxies_globals, getitem, getitem_tail, len, fast_types): where ACTIVE and the "
     "Python versions are, and the buffer types indexed in C"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastread",
                                    "Compiled tracked reads (see proxies.py).", -1, methods};

PyMODINIT_FUNC
PyInit__fastread(void)
{
#define INTERN(v, s)                                   \
    if ((v = PyUnicode_InternFromString(s)) == NULL) { \
        return NULL;                                   \
    }
    INTERN(s_ACTIVE, "ACTIVE");
    INTERN(s_array, "array");
    INTERN(s__idx, "_idx");
    INTERN(s_lencount, "lencount");
    INTERN(s__fmel, "_fmel");
    INTERN(s_out, "out");
    INTERN(s_id, "id");
    INTERN(s_strict, "strict");
    INTERN(s_tracker, "tracker");
    INTERN(s_check_strict, "check_strict");
    INTERN(s_internal_future_read, "internal_future_read");
    INTERN(s_append, "append");
    INTERN(s_extension, "extension");
    INTERN(s___len__, "__len__");
    k_zero = PyLong_FromLong(0);
    k_one = PyLong_FromLong(1);
    if (k_zero == NULL || k_one == NULL) return NULL;
    if (PyType_Ready(&ReadBufferType) < 0) return NULL;
    if (fr_record_module_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "ReadBuffer", (PyObject *)&ReadBufferType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef FASTREAD_SOURCE_SHA256
    /* setup.py's stamp of the sources (analyzers/tracking/_build.py) */
    if (PyModule_AddStringConstant(m, "SOURCE_SHA256", FASTREAD_SOURCE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
