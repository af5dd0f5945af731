/* The compiled hot path of FMEL's tracked line reads (see analyzers/tracking/proxies.py).
 *
 * ``__getitem__`` and ``__len__`` of a tracked backtrader ``LineBuffer`` subclass, doing exactly
 * what the pure-Python ``_plain_getitem`` and ``_plain_len`` of proxies.py do:
 *
 *   value = self.array[self._idx + ago]
 *   if ACTIVE:                                   # the proxies module's global
 *       pos = self._idx + ago (+ len(self.array) when negative: Python's wrap-around)
 *       tag = self._fmel
 *       tag.out.append((tag.id, ago, 1, pos + self.lencount - 1 - self._idx, value))
 *       if tag.strict: tag.tracker.check_strict()
 *   elif ago > 0:
 *       self._fmel.tracker.internal_future_read(self, ago)
 *   return value
 *
 * Any key that is not an exact int, an ``_idx`` that is not one, or an index that does not fit
 * a C ssize_t goes to the Python function given to ``init``, so errors and odd keys behave as in
 * Python. Main thread only (backtrader's), under the GIL. Built by ``make`` (setup.py).
 *
 * Why C: a Python-level ``__getitem__`` costs a frame per read; these reads are the bar loop's
 * most frequent operation (benchmarks/bench_reads.py measures both implementations). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *g_globals = NULL;        /* proxies.__dict__: ACTIVE is read there per call */
static PyObject *g_fallback = NULL;       /* proxies._plain_getitem */
static PyObject *g_len_fallback = NULL;   /* proxies._plain_len */
static PyObject *g_fast_types = NULL;     /* buffer types indexed in C: (array, deque, list) */
static PyObject *s_ACTIVE, *s_array, *s__idx, *s_lencount, *s__fmel, *s_out, *s_id, *s_strict,
    *s_tracker, *s_check_strict, *s_internal_future_read, *s_append;
static PyObject *k_zero, *k_one;

/* self.<name> as a new reference. With ``dict`` (the instance's own, given only for classes
 * where none of the names read here is a data descriptor: see proxies._dict_safe), an entry
 * there is what generic attribute lookup returns, without its walk of the class's MRO. */
static inline PyObject *
attr(PyObject *self, PyObject *dict, PyObject *name)
{
    if (dict != NULL) {
        PyObject *v = PyDict_GetItemWithError(dict, name);
        if (v != NULL) return Py_NewRef(v);
        if (PyErr_Occurred()) return NULL;
    }
    return PyObject_GetAttr(self, name);
}

/* the instance dict when the fast path may use it, else NULL (no error) */
static inline PyObject *
instance_dict(PyObject *self, int fast)
{
    if (!fast || Py_TYPE(self)->tp_getattro != PyObject_GenericGetAttr) return NULL;
    PyObject *d = PyObject_GenericGetDict(self, NULL);
    if (d == NULL) PyErr_Clear();
    return d;
}

/* 1 when ACTIVE is true, 0 when false, -1 on error */
static int
is_active(void)
{
    PyObject *active = PyDict_GetItemWithError(g_globals, s_ACTIVE);
    if (active == Py_True) return 1;
    if (active == Py_False) return 0;
    if (active == NULL) {
        if (PyErr_Occurred()) return -1;
        PyErr_SetString(PyExc_NameError, "name 'ACTIVE' is not defined");
        return -1;
    }
    return PyObject_IsTrue(active);
}

/* tag.out.append((tag.id, ago, size, bar, value)); with ``check``, also
 * ``if tag.strict: tag.tracker.check_strict()`` (a value read, not a len()) */
static int
record(PyObject *self, PyObject *dict, PyObject *ago, PyObject *size, Py_ssize_t bar_from_pos,
       PyObject *value, int check)
{
    PyObject *tag = attr(self, dict, s__fmel);
    if (tag == NULL) return -1;
    PyObject *out = PyObject_GetAttr(tag, s_out);
    PyObject *id = out ? PyObject_GetAttr(tag, s_id) : NULL;
    PyObject *bar = id ? PyLong_FromSsize_t(bar_from_pos) : NULL;
    PyObject *t = bar ? PyTuple_New(5) : NULL;
    if (t == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(id);
        Py_XDECREF(bar);
        Py_DECREF(tag);
        return -1;
    }
    Py_INCREF(ago);
    Py_INCREF(size);
    Py_INCREF(value);
    PyTuple_SET_ITEM(t, 0, id);
    PyTuple_SET_ITEM(t, 1, ago);
    PyTuple_SET_ITEM(t, 2, size);
    PyTuple_SET_ITEM(t, 3, bar);
    PyTuple_SET_ITEM(t, 4, value);
    if (PyLong_CheckExact(ago) && (PyFloat_CheckExact(value) || value == Py_None)) {
        /* numbers only (id, size and bar are ints too): it can never be part of a cycle, so
         * the collector need not walk it; it would untrack it at its first pass anyway
         * (_PyTuple_MaybeUntrack), after walking it once */
        PyObject_GC_UnTrack(t);
    }
    int rc;
    if (PyList_CheckExact(out)) {
        rc = PyList_Append(out, t);
    }
    else {
        PyObject *res = PyObject_CallMethodOneArg(out, s_append, t);
        rc = res ? 0 : -1;
        Py_XDECREF(res);
    }
    Py_DECREF(t);
    Py_DECREF(out);
    if (rc == 0 && check) {
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

static PyObject *
fallback(PyObject *func, PyObject *self, PyObject *key)
{
    PyObject *args[2] = {self, key};
    return PyObject_Vectorcall(func, args, key ? 2 : 1, NULL);
}

static inline PyObject *
getitem_impl(PyObject *self, PyObject *const *args, Py_ssize_t nargs, int fast)
{
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "__getitem__ expected 1 argument, got %zd", nargs);
        return NULL;
    }
    PyObject *key = args[0];
    if (!PyLong_CheckExact(key)) return fallback(g_fallback, self, key);
    Py_ssize_t ago = PyLong_AsSsize_t(key);
    if (ago == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return fallback(g_fallback, self, key);
    }
    PyObject *dict = instance_dict(self, fast);
    /* Python evaluates self.array before self._idx: so do we (same error when both lack) */
    PyObject *arr = attr(self, dict, s_array);
    if (arr == NULL) {
        Py_XDECREF(dict);
        return NULL;
    }
    PyObject *idxo = attr(self, dict, s__idx);
    if (idxo == NULL) {
        Py_XDECREF(dict);
        Py_DECREF(arr);
        return NULL;
    }
    Py_ssize_t idx = PyLong_CheckExact(idxo) ? PyLong_AsSsize_t(idxo) : -1;
    int odd = !PyLong_CheckExact(idxo) || (idx == -1 && PyErr_Occurred()) ||
              (ago > 0 && idx > PY_SSIZE_T_MAX - ago) ||
              (ago < 0 && idx < PY_SSIZE_T_MIN - ago) || !fast_type(arr);
    Py_DECREF(idxo);
    if (odd) {
        PyErr_Clear();
        Py_XDECREF(dict);
        Py_DECREF(arr);
        return fallback(g_fallback, self, key);
    }
    Py_ssize_t pos = idx + ago;
    PyObject *value = PySequence_GetItem(arr, pos); /* negative: + len, as Python indexing */
    if (value == NULL) {
        Py_XDECREF(dict);
        Py_DECREF(arr);
        return NULL;
    }
    int active = is_active();
    if (active > 0) {
        if (pos < 0) {
            Py_ssize_t n = PyObject_Length(arr);
            if (n < 0) goto fail;
            pos += n;
        }
        PyObject *lco = attr(self, dict, s_lencount);
        if (lco == NULL) goto fail;
        Py_ssize_t lc = PyLong_AsSsize_t(lco);
        Py_DECREF(lco);
        if (lc == -1 && PyErr_Occurred()) goto fail;
        if (record(self, dict, key, k_one, pos + lc - 1 - idx, value, 1) < 0) goto fail;
    }
    else if (active < 0) {
        goto fail;
    }
    else if (ago > 0) {
        PyObject *tag = attr(self, dict, s__fmel);
        PyObject *tracker = tag ? PyObject_GetAttr(tag, s_tracker) : NULL;
        Py_XDECREF(tag);
        PyObject *res = tracker ? PyObject_CallMethodObjArgs(
                                      tracker, s_internal_future_read, self, key, NULL)
                                : NULL;
        Py_XDECREF(tracker);
        if (res == NULL) goto fail;
        Py_DECREF(res);
    }
    Py_XDECREF(dict);
    Py_DECREF(arr);
    return value;
fail:
    Py_XDECREF(dict);
    Py_DECREF(arr);
    Py_DECREF(value);
    return NULL;
}

static PyObject *
getitem_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return getitem_impl(self, args, nargs, 1);
}

static PyObject *
getitem_generic(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return getitem_impl(self, args, nargs, 0);
}

static inline PyObject *
len_impl(PyObject *self, int fast)
{
    PyObject *dict = instance_dict(self, fast);
    PyObject *lco = attr(self, dict, s_lencount);
    if (lco == NULL || !PyLong_CheckExact(lco)) {
        Py_XDECREF(dict);
        if (lco == NULL) return NULL;
        Py_DECREF(lco);
        return fallback(g_len_fallback, self, NULL);
    }
    int active = is_active();
    if (active > 0) {
        Py_ssize_t lc = PyLong_AsSsize_t(lco);
        if ((lc == -1 && PyErr_Occurred()) ||
            record(self, dict, k_zero, k_zero, lc - 1, Py_None, 0) < 0) {
            active = -1;
        }
    }
    Py_XDECREF(dict);
    if (active < 0) {
        Py_DECREF(lco);
        return NULL;
    }
    return lco;
}

static PyObject *
len_fast(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return len_impl(self, 1);
}

static PyObject *
len_generic(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return len_impl(self, 0);
}

#define GETITEM_DOC "x.__getitem__(ago): the value ``ago`` bars back, recorded while ACTIVE."
#define LEN_DOC "len(x), recorded as a read of the whole line (size 0) while ACTIVE."
static PyMethodDef getitem_defs[2] = {
    {"__getitem__", (PyCFunction)(void (*)(void))getitem_generic, METH_FASTCALL, GETITEM_DOC},
    {"__getitem__", (PyCFunction)(void (*)(void))getitem_fast, METH_FASTCALL, GETITEM_DOC}};
static PyMethodDef len_defs[2] = {
    {"__len__", (PyCFunction)len_generic, METH_NOARGS, LEN_DOC},
    {"__len__", (PyCFunction)len_fast, METH_NOARGS, LEN_DOC}};

static PyObject *
make_descriptors(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *cls;
    int fast;
    if (!PyArg_ParseTuple(args, "O!p:descriptors", &PyType_Type, &cls, &fast)) return NULL;
    PyObject *g = PyDescr_NewMethod((PyTypeObject *)cls, &getitem_defs[fast]);
    PyObject *n = g ? PyDescr_NewMethod((PyTypeObject *)cls, &len_defs[fast]) : NULL;
    if (n == NULL) {
        Py_XDECREF(g);
        return NULL;
    }
    return Py_BuildValue("(NN)", g, n);
}

static PyObject *
init(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *g, *f, *lf, *types;
    if (!PyArg_ParseTuple(args, "O!OOO!:init", &PyDict_Type, &g, &f, &lf, &PyTuple_Type, &types))
        return NULL;
    /* the caller passes C types whose sq_item indexes as their subscript does */
    Py_XSETREF(g_fast_types, Py_NewRef(types));
    Py_XSETREF(g_globals, Py_NewRef(g));
    Py_XSETREF(g_fallback, Py_NewRef(f));
    Py_XSETREF(g_len_fallback, Py_NewRef(lf));
    Py_RETURN_NONE;
}

/* unpack(reads) -> (ints, values, is_float): the raw reads of a batch (a list of 5-tuples,
 * as the tracked classes append them) as columns, in one pass: ``ints`` the bytes of an int64
 * (n, 4) array (tag id, ago, size, bar index), ``values`` those of a float64 (n,) array (the
 * value when it is exactly a float, else 0.0), ``is_float`` those of a bool (n,) array.
 * Ints go through ``__index__`` (numpy ints, bools) as numpy's int64 conversion does; a read
 * that is not a 5-tuple raises TypeError, an int beyond int64 OverflowError. Any thread, under
 * the GIL (the decision writer's). */
static PyObject *
unpack(PyObject *Py_UNUSED(mod), PyObject *reads)
{
    if (!PyList_CheckExact(reads)) {
        PyErr_SetString(PyExc_TypeError, "unpack() needs a list of raw reads");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(reads);
    PyObject *ints = PyBytes_FromStringAndSize(NULL, n * 4 * (Py_ssize_t)sizeof(long long));
    PyObject *vals = ints ? PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(double))
                          : NULL;
    PyObject *isf = vals ? PyBytes_FromStringAndSize(NULL, n) : NULL;
    if (isf == NULL) {
        Py_XDECREF(ints);
        Py_XDECREF(vals);
        return NULL;
    }
    long long *ip = (long long *)PyBytes_AS_STRING(ints);
    double *vp = (double *)PyBytes_AS_STRING(vals);
    char *fp = PyBytes_AS_STRING(isf);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(reads, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) {
            PyErr_Format(PyExc_TypeError, "raw read %zd is not a 5-tuple", i);
            goto fail;
        }
        for (int k = 0; k < 4; k++) {
            PyObject *o = PyTuple_GET_ITEM(t, k);
            long long v;
            if (PyLong_CheckExact(o)) {
                v = PyLong_AsLongLong(o);
            }
            else {
                PyObject *ix = PyNumber_Index(o);
                if (ix == NULL) goto fail;
                v = PyLong_AsLongLong(ix);
                Py_DECREF(ix);
            }
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
    return Py_BuildValue("(NNN)", ints, vals, isf);
fail:
    Py_DECREF(ints);
    Py_DECREF(vals);
    Py_DECREF(isf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"unpack", unpack, METH_O,
     "unpack(reads) -> (ints, values, is_float) bytes of int64 (n, 4), float64 (n,), bool (n,)"},
    {"descriptors", make_descriptors, METH_VARARGS,
     "descriptors(cls, dict_safe) -> (__getitem__, __len__) method descriptors for instances "
     "of cls; dict_safe: read the line's attributes from its instance dict"},
    {"init", init, METH_VARARGS,
     "init(proxies_globals, getitem_fallback, len_fallback, fast_types): where ACTIVE and the "
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
    k_zero = PyLong_FromLong(0);
    k_one = PyLong_FromLong(1);
    if (k_zero == NULL || k_one == NULL) return NULL;
    return PyModule_Create(&moddef);
}
