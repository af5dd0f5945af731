/* FMEL's once-a-bar decision record in one C call: record_bar(analyzer, stage) does what
 * FMELAnalyzer._record_py (analyzers/fmel.py) does, in the same order, for the usual bar, and
 * calls _record_py itself for any other.
 *
 * The usual bar: the analyzer's tracker is an AccessTracker with its own sync() and capture()
 * (none set on the instance), the agent's callbacks are the ones FMEL wrapped, no line object
 * was made since the last bar (sync() would do nothing), the read buffer is a ReadBuffer whose
 * reads are handed over (a deferring analyzer, its sources not stale) or empty, the order
 * events a list, no note waiting, and the bar time an exact float. That is checked first,
 * without side effects (reading the bar time too: an exception there is left to _record_py to
 * raise where it reads it); anything else goes to _record_py before anything was taken. Then,
 * in _record_py's order: the reads taken and handed over as a PendingReads with the feeds'
 * positions (the tracker's ``_capture_c``), the order events (the list replaced, then
 * summarised by fmel's ``_summary``), reasoning and confidence (taken, then None), the wall
 * time (fmel's ``time.time``, looked up at each call: a frozen clock is used), the bar time
 * rounded to the millisecond (fmel._round_ms's expressions, which it calls for what they do not
 * cover), the portfolio value and cash (the analyzer's ``_getvalue``, ``broker.getcash()``),
 * the positions (kept ones, or ``_positions(broker)``), the record (``tuple.__new__`` of the
 * record class), ``decisions += 1`` (read again: a call above may have recorded), and
 * ``writer.submit(record)`` or the in-memory list. The analyzer's attributes are read from its
 * instance dict where they are (class_as_expected: no data descriptor of those names, no
 * attribute hooks of the class's own), else as Python reads them (a class attribute, or the
 * same AttributeError). fmel's globals are read when used (time, _summary, _PENDING_KEEP,
 * _notes_json), or taken at record_init and checked unchanged each bar (globals_as_taken: the
 * record classes, PendingReads and its slots, _round_ms, the epoch constants).
 *
 * Why C: the Python version is ~40 attribute loads and ten calls a bar; this one saves ~9 k
 * (SMA-cross) to ~15 k (read-heavy) instructions a bar of the benchmark run (docs/
 * benchmarks.md, twenty-fifth pass). Main thread, under the GIL. Python code it calls, and a
 * dict lookup (a key of another type with the same hash runs its __eq__), may run anything:
 * every object used after such a point is owned, never borrowed.
 * tests/unit/test_record_c.py compares its records, and the exceptions, with _record_py's. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>

#include "_record.h"

static PyObject *g_plain_record = NULL;    /* analyzers.schema.DecisionRecord */
static PyObject *g_deferred_record = NULL; /* analyzers.deferred.DeferredRecord */
static PyObject *g_pending_type = NULL;    /* analyzers.deferred.PendingReads */
static PyObject *g_absent = NULL;          /* fmel._ABSENT */
static PyObject *g_ind_key = NULL;         /* LineIterator.IndType */
static PyObject *g_round_ms = NULL;        /* fmel._round_ms */
static PyObject *g_fmel_globals = NULL;    /* analyzers.fmel's module dict */
static uint64_t g_globals_version = 0;     /* its ma_version_tag when the names below were seen */
static PyObject *g_watched = NULL;         /* ((name, value at record_init), ...) of fmel */
static PyObject *g_epoch_obj = NULL, *g_seconds_obj = NULL; /* BT_EPOCH_DAYS, SECONDS_PER_DAY */
static PyTypeObject *g_analyzer_type = NULL; /* FMELAnalyzer */
static PyObject *g_instance_reads = NULL;  /* the analyzer attributes read from its dict */
static PyTypeObject *g_tracker_type = NULL; /* analyzers.tracking.AccessTracker */
static PyTypeObject *g_read_buffer = NULL; /* _fastread.ReadBuffer */
static PyObject *g_pending_slots = NULL;   /* PendingReads' slot descriptors, in s_slots order */
static double g_epoch_days = 0.0, g_seconds_per_day = 0.0;

static PyObject *s_run_info, *s__agent_vars, *s__agent_len, *s__callback_items, *s_tracker,
    *s__strategy, *s__graph, *s__lineiterators, *s__registered, *s_reads, *s__defer, *s__stale,
    *s__events, *s__notes, *s__reasoning, *s__confidence, *s__held, *s__dtline, *s_array, *s__idx,
    *s_take, *s__capture_c, *s__captured, *s_capture, *s__pending, *s_append, *s_popleft,
    *s_done, *s_strategy, *s_broker, *s__getvalue, *s_getcash, *s__positions,
    *s_decisions, *s_writer, *s_submit, *s__keep, *s_records, *s__record_py, *s_HOLD, *s_time,
    *s__summary, *s_sync, *s__PENDING_KEEP,
    *s__notes_json;
static PyObject *k_one = NULL;
static int g_ready = 0;

/* the slots PendingReads.__init__ sets, in its order */
static const char *const slot_names[] = {"_tracker", "_reads", "_state", "_result", "_cols",
                                         "_lookaheads"};
#define N_SLOTS 6

/* d[key] as a new reference; NULL when missing or on an exception (the caller's to_slow
 * tells them apart). */
static PyObject *
get_new(PyObject *d, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(d, key);
    return Py_XNewRef(v);
}

/* obj.name as _record_py reads it: the instance dict's entry (FMELAnalyzer.__init__ takes the
 * compiled record only for classes with no data descriptor of these names), else the generic
 * lookup (a class attribute, or Python's AttributeError). */
static PyObject *
attr(PyObject *obj, PyObject *d, PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(d, name);
    if (v != NULL) return Py_NewRef(v);
    if (PyErr_Occurred()) return NULL;
    return PyObject_GetAttr(obj, name);
}

/* fmel's module global ``name`` as _record_py finds it when it runs */
static PyObject *
global(PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(g_fmel_globals, name);
    if (v != NULL) return Py_NewRef(v);
    if (!PyErr_Occurred()) PyErr_Format(PyExc_NameError, "name '%U' is not defined", name);
    return NULL;
}

static PyObject *
slow(PyObject *analyzer, PyObject *stage)
{
    return PyObject_CallMethodOneArg(analyzer, s__record_py, stage);
}

/* d[key] owned into *out: 1 found, 0 missing, -1 an exception. A dict lookup can run code
 * (a key of another type with the same hash: its __eq__), so nothing found earlier is kept
 * borrowed across the next one. */
static int
owned(PyObject *d, PyObject *key, PyObject **out)
{
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL) {
        *out = NULL;
        return PyErr_Occurred() ? -1 : 0;
    }
    *out = Py_NewRef(v);
    return 1;
}

/* a Python int as a C ssize_t; 0 (not usual) when it is not an exact int that fits */
static int
ssize_of(PyObject *v, Py_ssize_t *out)
{
    if (!PyLong_CheckExact(v)) return 0;
    *out = PyLong_AsSsize_t(v);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* The agent's callbacks as FMEL wrapped them (else FMELAnalyzer._check_callbacks runs). */
static int
callbacks_as_wrapped(PyObject *d)
{
    PyObject *agent = NULL, *agent_len = NULL, *items = NULL;
    int r = owned(d, s__agent_vars, &agent);
    if (r > 0) r = owned(d, s__agent_len, &agent_len);
    if (r > 0) r = owned(d, s__callback_items, &items);
    Py_ssize_t want = 0;
    if (r > 0) {
        r = PyDict_Check(agent) && PyList_CheckExact(items) && ssize_of(agent_len, &want) &&
            PyDict_GET_SIZE(agent) == want;
    }
    /* a copy: the list may be replaced or changed by code a lookup runs */
    PyObject *copy = r > 0 ? PyList_AsTuple(items) : NULL;
    if (r > 0 && copy == NULL) r = -1;
    for (Py_ssize_t i = 0; r > 0 && i < PyTuple_GET_SIZE(copy); i++) {
        PyObject *item = PyTuple_GET_ITEM(copy, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(item, 0))) {
            r = 0;
            break;
        }
        PyObject *seen = NULL;
        int found = owned(agent, PyTuple_GET_ITEM(item, 0), &seen);
        if (found < 0) {
            r = -1;
            break;
        }
        r = (found ? seen : g_absent) == PyTuple_GET_ITEM(item, 1);
        Py_XDECREF(seen);
    }
    Py_XDECREF(copy);
    Py_XDECREF(items);
    Py_XDECREF(agent_len);
    Py_XDECREF(agent);
    return r;
}

/* No line object made since the last bar: AccessTracker.sync() would do nothing. */
static int
nothing_to_sync(PyObject *td)
{
    PyObject *strategy = NULL, *graph = NULL, *reg = NULL, *sd = NULL, *li = NULL, *inds = NULL;
    int r = owned(td, s__strategy, &strategy);
    if (r > 0) r = owned(td, s__graph, &graph);
    if (r <= 0 || strategy == Py_None || graph == Py_None) goto done;
    Py_ssize_t want = 0, n = 0;
    if ((r = owned(td, s__registered, &reg)) <= 0) goto done;
    if (!(r = ssize_of(reg, &want))) goto done;
    PyObject **sdp = _PyObject_GetDictPtr(strategy);
    if (sdp == NULL || *sdp == NULL) {
        r = 0;
        goto done;
    }
    sd = Py_NewRef(*sdp);
    if ((r = owned(sd, s__lineiterators, &li)) <= 0) goto done;
    /* backtrader's defaultdict(list) (a static type: get() adds no key) */
    if (!PyDict_Check(li) || (Py_TYPE(li)->tp_flags & Py_TPFLAGS_HEAPTYPE)) {
        r = 0;
        goto done;
    }
    int found = owned(li, g_ind_key, &inds);
    if (found < 0) {
        r = -1;
        goto done;
    }
    if (found) {
        if (!PyList_CheckExact(inds)) {
            r = 0;
            goto done;
        }
        n = PyList_GET_SIZE(inds);
    }
    r = n == want;
done:
    Py_XDECREF(inds);
    Py_XDECREF(li);
    Py_XDECREF(sd);
    Py_XDECREF(reg);
    Py_XDECREF(graph);
    Py_XDECREF(strategy);
    return r;
}

/* fmel's globals the C took at record_init (the record classes, PendingReads, _round_ms, the
 * epoch constants...) are still those: 1, else 0 (someone patched one: _record_py). One compare
 * while fmel's dict is unchanged (its version tag), the names looked up when it changed. */
static int
globals_as_taken(void)
{
    uint64_t version = ((PyDictObject *)g_fmel_globals)->ma_version_tag; /* CPython 3.11 */
    if (version == g_globals_version) return 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(g_watched); i++) {
        PyObject *pair = PyTuple_GET_ITEM(g_watched, i), *now = NULL;
        int found = owned(g_fmel_globals, PyTuple_GET_ITEM(pair, 0), &now);
        Py_XDECREF(now); /* compared by identity only */
        if (found < 0) return -1;
        if (!found || now != PyTuple_GET_ITEM(pair, 1)) return 0;
    }
    g_globals_version = version;
    return 1;
}

/* The analyzer's class reads its attributes as _record_py would find them in its dict: the
 * generic attribute lookup (no __getattribute__ or __getattr__ of its own), no data
 * descriptor (property) of those names, FMELAnalyzer's _record_py (a subclass's own runs for
 * every bar), none set on the instance. Checked every bar (a class changed, or __class__
 * set, during the run). */
static PyTypeObject *g_class_seen = NULL; /* a class found as expected, at version tag: */
static unsigned int g_class_seen_tag = 0;   /* (any change to it or a base changes the tag) */

static int
class_as_expected(PyObject *analyzer, PyObject *d)
{
    int own = PyDict_Contains(d, s__record_py);
    if (own != 0) return own < 0 ? -1 : 0;
    PyTypeObject *tp = Py_TYPE(analyzer);
    int tagged = PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG) &&
                 PyType_HasFeature(g_analyzer_type, Py_TPFLAGS_VALID_VERSION_TAG);
    if (tagged && tp == g_class_seen && tp->tp_version_tag == g_class_seen_tag) return 1;
    if (tp->tp_getattro != PyObject_GenericGetAttr) return 0;
    if (!PyType_IsSubtype(tp, g_analyzer_type)) return 0;
    if (_PyType_Lookup(tp, s__record_py) != _PyType_Lookup(g_analyzer_type, s__record_py)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(g_instance_reads); i++) {
        PyObject *found = _PyType_Lookup(tp, PyTuple_GET_ITEM(g_instance_reads, i));
        if (found != NULL && Py_TYPE(found)->tp_descr_set != NULL) return 0;
    }
    /* the lookups above gave the classes valid tags (FMELAnalyzer's too, whose _record_py a
     * patch replaces: its tag changes, and with it every subclass's) */
    if (PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG)) {
        g_class_seen = tp; /* compared by address only: never dereferenced unless current */
        g_class_seen_tag = tp->tp_version_tag;
    }
    return 1;
}

/* 1: the usual bar (see the top); 0: not; -1: an exception. */
static int
usual_bar(PyObject *analyzer, PyObject *d, PyObject *tracker, PyObject *td)
{
    int ok = globals_as_taken();
    if (ok > 0) ok = class_as_expected(analyzer, d);
    if (ok <= 0) return ok;
    /* AccessTracker's own sync() and capture() (what the C does in their place) */
    if (Py_TYPE(tracker) != g_tracker_type) return 0;
    int r = PyDict_Contains(td, s_sync);
    if (r == 0) r = PyDict_Contains(td, s_capture);
    if (r != 0) return r < 0 ? -1 : 0;
    r = callbacks_as_wrapped(d);
    if (r > 0) r = nothing_to_sync(td);
    if (r <= 0) return r;
    /* the reads: a ReadBuffer, handed over (a deferring analyzer, the tags' sources fresh) or
     * none; a run */
    PyObject *v = NULL;
    Py_ssize_t n_reads = 0;
    if ((r = owned(td, s_reads, &v)) > 0) {
        r = Py_TYPE(v) == g_read_buffer;
        if (r && (n_reads = PyObject_Length(v)) < 0) r = -1;
        Py_DECREF(v);
    }
    int defer = 0;
    if (r > 0 && (r = owned(d, s__defer, &v)) > 0) {
        /* reads resolved at the bar (no writer, live feeds, strict mode): _record_py */
        defer = v == Py_True;
        r = defer || (v == Py_False && n_reads == 0);
        Py_DECREF(v);
    }
    if (r > 0 && defer && (r = owned(td, s__stale, &v)) > 0) {
        r = v == Py_False;
        Py_DECREF(v);
    }
    if (r > 0 && (r = owned(d, s_run_info, &v)) > 0) {
        r = v != Py_None;
        Py_DECREF(v);
    }
    return r;
}

/* _round_ms((dtl.array[dtl._idx] - BT_EPOCH_DAYS) * SECONDS_PER_DAY), as _record_py evaluates
 * it: an exact float in C (the same IEEE operations; fmel._round_ms's expressions, which it is
 * called for where they do not cover), anything else with Python's number protocol. */
static PyObject *
bar_time(PyObject *dtl)
{
    PyObject *arr = PyObject_GetAttr(dtl, s_array);
    if (arr == NULL) return NULL;
    PyObject *idx = PyObject_GetAttr(dtl, s__idx);
    if (idx == NULL) {
        Py_DECREF(arr);
        return NULL;
    }
    PyObject *x = PyObject_GetItem(arr, idx);
    Py_DECREF(arr);
    Py_DECREF(idx);
    if (x == NULL) return NULL;
    PyObject *p = NULL;
    if (PyFloat_CheckExact(x)) {
        double posix = (PyFloat_AS_DOUBLE(x) - g_epoch_days) * g_seconds_per_day;
        double y = posix * 1000.0;
        if (y == y && -0x1p49 < y && y < 0x1p49) {
            double k = nearbyint(y); /* round-half-even, as Python's round() */
            double diff = y - k;
            if (-0.4 < diff && diff < 0.4) {
                Py_DECREF(x);
                return PyFloat_FromDouble(k != 0.0 ? k / 1000.0 : copysign(0.0, posix));
            }
        }
        p = PyFloat_FromDouble(posix);
    }
    else {
        PyObject *days = PyNumber_Subtract(x, g_epoch_obj);
        if (days != NULL) {
            p = PyNumber_Multiply(days, g_seconds_obj);
            Py_DECREF(days);
        }
    }
    Py_DECREF(x);
    if (p == NULL) return NULL;
    PyObject *r = PyObject_CallOneArg(g_round_ms, p);
    Py_DECREF(p);
    return r;
}

/* time.time() as _record_py calls it: fmel's global ``time``, its attribute ``time`` (a clock
 * patched there, freezegun's or time-machine's, is the one called) */
static PyObject *
wall_time(void)
{
    PyObject *mod = global(s_time);
    if (mod == NULL) return NULL;
    PyObject *fn = PyObject_GetAttr(mod, s_time);
    Py_DECREF(mod);
    if (fn == NULL) return NULL;
    PyObject *t = PyObject_CallNoArgs(fn);
    Py_DECREF(fn);
    return t;
}

/* PendingReads(tracker, reads, state) without its __init__ frame: the object allocated as
 * object.__new__ does and its six slots set through their descriptors, in __init__'s order. */
static PyObject *
new_pending(PyObject *tracker, PyObject *reads, PyObject *state)
{
    PyTypeObject *tp = (PyTypeObject *)g_pending_type;
    PyObject *p = tp->tp_alloc(tp, 0);
    if (p == NULL) return NULL;
    PyObject *values[N_SLOTS] = {tracker, reads, state, Py_None, Py_None, Py_None};
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *descr = PyTuple_GET_ITEM(g_pending_slots, i);
        if (Py_TYPE(descr)->tp_descr_set(descr, p, values[i]) < 0) {
            Py_DECREF(p);
            return NULL;
        }
    }
    return p;
}

/* if len(pending) > _PENDING_KEEP: while pending and pending[0].done: pending.popleft() (as
 * _record_py, fmel's global read now) */
static int
trim_pending(PyObject *pending)
{
    Py_ssize_t n = PyObject_Length(pending);
    if (n < 0) return -1;
    PyObject *len = PyLong_FromSsize_t(n);
    PyObject *keep = len == NULL ? NULL : global(s__PENDING_KEEP);
    int over = keep == NULL ? -1 : PyObject_RichCompareBool(len, keep, Py_GT);
    Py_XDECREF(keep);
    Py_XDECREF(len);
    if (over <= 0) return over;
    while (n > 0) {
        PyObject *first = PySequence_GetItem(pending, 0);
        if (first == NULL) return -1;
        PyObject *done = PyObject_GetAttr(first, s_done);
        Py_DECREF(first);
        if (done == NULL) return -1;
        int t = PyObject_IsTrue(done);
        Py_DECREF(done);
        if (t < 0) return -1;
        if (!t) return 0;
        PyObject *gone = PyObject_CallMethodNoArgs(pending, s_popleft);
        if (gone == NULL) return -1;
        Py_DECREF(gone);
        if ((n = PyObject_Length(pending)) < 0) return -1;
    }
    return 0;
}

PyObject *
fr_record_bar(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "record_bar(analyzer, stage) takes 2 arguments");
        return NULL;
    }
    if (!g_ready) {
        PyErr_SetString(PyExc_RuntimeError, "record_bar(): record_init() was not called");
        return NULL;
    }
    PyObject *analyzer = args[0], *stage = args[1];
    PyObject **dp = _PyObject_GetDictPtr(analyzer);
    if (dp == NULL || *dp == NULL) return slow(analyzer, stage);
    PyObject *d = Py_NewRef(*dp);
    PyObject *tracker = NULL, *td = NULL, *run = NULL, *defer = NULL, *raw = NULL, *taken = NULL,
             *state = NULL, *da = NULL, *la = NULL, *make = NULL, *ts = NULL, *bt = NULL,
             *broker = NULL, *value = NULL, *cash = NULL, *positions = NULL, *decisions = NULL,
             *rec = NULL, *out = NULL, *tmp = NULL, *held = NULL, *n_obj = NULL, *events = NULL,
             *action = NULL, *reasoning = NULL, *confidence = NULL, *notes = NULL, *dtl = NULL;
    if ((tracker = get_new(d, s_tracker)) == NULL) goto to_slow;
    PyObject **tdp = _PyObject_GetDictPtr(tracker);
    if (tdp == NULL || *tdp == NULL) goto to_slow;
    td = Py_NewRef(*tdp);
    int usual = usual_bar(analyzer, d, tracker, td);
    if (usual < 0) goto fail;
    if (!usual) goto to_slow;
    /* from here on as _record_py, side effects included */
    run = get_new(d, s_run_info);
    defer = get_new(d, s__defer);
    raw = get_new(td, s_reads);
    if (run == NULL || defer == NULL || raw == NULL) goto to_slow;
    Py_ssize_t n_reads = PyObject_Length(raw);
    if (n_reads < 0) goto fail;
    if ((n_obj = PyLong_FromSsize_t(n_reads)) == NULL) goto fail;
    if (n_reads == 0) {
        da = PyTuple_New(0);
        la = PyLong_FromLong(0);
        make = Py_NewRef(g_plain_record);
        if (da == NULL || la == NULL) goto fail;
    }
    else if (defer == Py_True && Py_TYPE(raw) == g_read_buffer) {
        if ((taken = PyObject_CallMethodNoArgs(raw, s_take)) == NULL) goto fail;
        PyObject *cap = NULL, *captured = NULL;
        int has = owned(td, s__capture_c, &cap);
        if (has > 0) has = owned(td, s__captured, &captured);
        if (has > 0 && cap != Py_None) {
            state = PyObject_CallOneArg(cap, captured);
        }
        else if (has >= 0) {
            state = PyObject_CallMethodNoArgs(tracker, s_capture);
        }
        Py_XDECREF(cap);
        Py_XDECREF(captured);
        if (state == NULL) goto fail;
        if ((da = new_pending(tracker, taken, state)) == NULL) goto fail;
        la = Py_NewRef(da);
        PyObject *pending = attr(analyzer, d, s__pending);
        if (pending == NULL) goto fail;
        tmp = PyObject_CallMethodOneArg(pending, s_append, da);
        if (tmp == NULL || trim_pending(pending) < 0) {
            Py_DECREF(pending);
            goto fail;
        }
        Py_CLEAR(tmp);
        Py_DECREF(pending);
        make = Py_NewRef(g_deferred_record);
    }
    else {
        goto to_slow; /* changed since usual_bar looked (code a lookup ran): _record_py */
    }
    /* the bar's order events, as _record_py: if any, the list replaced, then summarised */
    PyObject *ev = attr(analyzer, d, s__events);
    if (ev == NULL) goto fail;
    int any = PyObject_IsTrue(ev);
    if (any > 0) {
        PyObject *fresh = PyList_New(0);
        if (fresh == NULL || PyObject_SetAttr(analyzer, s__events, fresh) < 0) {
            Py_XDECREF(fresh);
            Py_DECREF(ev);
            goto fail;
        }
        Py_DECREF(fresh);
        events = PySequence_Tuple(ev);
        Py_DECREF(ev);
        if (events == NULL) goto fail;
        PyObject *summary = global(s__summary);
        if (summary == NULL) goto fail;
        action = PyObject_CallOneArg(summary, events);
        Py_DECREF(summary);
        if (action == NULL) goto fail;
    }
    else {
        Py_DECREF(ev);
        if (any < 0 || (events = PyTuple_New(0)) == NULL) goto fail;
        action = Py_NewRef(s_HOLD);
    }
    /* the notes, if any: fmel._notes_json (json.dumps as _record_py, then emptied) */
    PyObject *waiting = attr(analyzer, d, s__notes);
    if (waiting == NULL) goto fail;
    int has_notes = PyObject_IsTrue(waiting);
    Py_DECREF(waiting);
    if (has_notes < 0) goto fail;
    if (has_notes) {
        PyObject *to_json = global(s__notes_json);
        if (to_json == NULL) goto fail;
        notes = PyObject_CallOneArg(to_json, analyzer);
        Py_DECREF(to_json);
        if (notes == NULL) goto fail;
    }
    else {
        notes = Py_NewRef(Py_None);
    }
    /* reasoning and confidence taken once */
    if ((reasoning = attr(analyzer, d, s__reasoning)) == NULL) goto fail;
    if ((confidence = attr(analyzer, d, s__confidence)) == NULL) goto fail;
    if (reasoning != Py_None || confidence != Py_None) {
        if (PyObject_SetAttr(analyzer, s__reasoning, Py_None) < 0 ||
            PyObject_SetAttr(analyzer, s__confidence, Py_None) < 0) {
            goto fail;
        }
    }
    PyObject *strategy = attr(analyzer, d, s_strategy);
    if (strategy == NULL) goto fail;
    broker = PyObject_GetAttr(strategy, s_broker);
    Py_DECREF(strategy);
    if (broker == NULL) goto fail;
    if ((held = attr(analyzer, d, s__held)) == NULL) goto fail;
    if ((dtl = attr(analyzer, d, s__dtline)) == NULL) goto fail;
    if ((decisions = attr(analyzer, d, s_decisions)) == NULL) goto fail;
    if ((ts = wall_time()) == NULL) goto fail;
    if ((bt = bar_time(dtl)) == NULL) goto fail;
    PyObject *getvalue = attr(analyzer, d, s__getvalue);
    if (getvalue == NULL) goto fail;
    tmp = PyObject_CallNoArgs(getvalue);
    Py_DECREF(getvalue);
    if (tmp == NULL || (value = PyNumber_Float(tmp)) == NULL) goto fail;
    Py_CLEAR(tmp);
    if ((tmp = PyObject_CallMethodNoArgs(broker, s_getcash)) == NULL) goto fail;
    if ((cash = PyNumber_Float(tmp)) == NULL) goto fail;
    Py_CLEAR(tmp);
    if (held == Py_None) {
        positions = PyObject_CallMethodOneArg(analyzer, s__positions, broker);
        if (positions == NULL) goto fail;
    }
    else {
        positions = Py_NewRef(held);
    }
    PyTypeObject *rt = (PyTypeObject *)make;
    rec = rt->tp_alloc(rt, 16);
    if (rec == NULL) goto fail;
    PyObject *fields[16] = {run,   decisions, ts,   bt,        stage,      action,
                            events, da,       n_obj, la,       value,      cash,
                            positions, reasoning, confidence, notes};
    for (int i = 0; i < 16; i++) PyTuple_SET_ITEM(rec, i, Py_NewRef(fields[i]));
    /* self.decisions += 1: read again (what the calls above ran may have recorded too) */
    PyObject *now = attr(analyzer, d, s_decisions);
    if (now == NULL) goto fail;
    PyObject *next = PyNumber_InPlaceAdd(now, k_one);
    Py_DECREF(now);
    if (next == NULL) goto fail;
    int bad = PyObject_SetAttr(analyzer, s_decisions, next);
    Py_DECREF(next);
    if (bad < 0) goto fail;
    PyObject *writer = attr(analyzer, d, s_writer);
    if (writer == NULL) goto fail;
    if (writer != Py_None) {
        tmp = PyObject_CallMethodOneArg(writer, s_submit, rec);
        Py_DECREF(writer);
        if (tmp == NULL) goto fail;
    }
    else {
        Py_DECREF(writer);
        PyObject *keep = attr(analyzer, d, s__keep);
        if (keep == NULL) goto fail;
        int k = PyObject_IsTrue(keep);
        Py_DECREF(keep);
        if (k < 0) goto fail;
        if (k) {
            PyObject *records = attr(analyzer, d, s_records);
            if (records == NULL) goto fail;
            tmp = PyObject_CallMethodOneArg(records, s_append, rec);
            Py_DECREF(records);
            if (tmp == NULL) goto fail;
        }
    }
    out = Py_NewRef(Py_None);
    goto done;
to_slow:
    if (PyErr_Occurred()) goto fail;
    out = slow(analyzer, stage);
    goto done;
fail:
    out = NULL;
done:
    Py_XDECREF(tmp);
    Py_XDECREF(notes);
    Py_XDECREF(confidence);
    Py_XDECREF(reasoning);
    Py_XDECREF(action);
    Py_XDECREF(events);
    Py_XDECREF(rec);
    Py_XDECREF(positions);
    Py_XDECREF(cash);
    Py_XDECREF(value);
    Py_XDECREF(ts);
    Py_XDECREF(decisions);
    Py_XDECREF(held);
    Py_XDECREF(broker);
    Py_XDECREF(make);
    Py_XDECREF(la);
    Py_XDECREF(da);
    Py_XDECREF(state);
    Py_XDECREF(taken);
    Py_XDECREF(n_obj);
    Py_XDECREF(raw);
    Py_XDECREF(defer);
    Py_XDECREF(run);
    Py_XDECREF(bt);
    Py_XDECREF(dtl);
    Py_XDECREF(td);
    Py_XDECREF(tracker);
    Py_DECREF(d);
    return out;
}

/* the fmel globals record_bar takes as they are here (globals_as_taken) */
static const char *const watched_names[] = {"DecisionRecord", "DeferredRecord", "PendingReads",
                                            "_ABSENT", "_round_ms", "BT_EPOCH_DAYS",
                                            "SECONDS_PER_DAY", "take_reads", "_tuple_new"};
#define N_WATCHED 9

PyObject *
fr_record_init(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *globals, *ind, *rbuf, *tracker, *analyzer, *reads;
    if (!PyArg_ParseTuple(args, "O!OO!O!O!O!:record_init", &PyDict_Type, &globals, &ind,
                          &PyType_Type, &rbuf, &PyType_Type, &tracker, &PyType_Type, &analyzer,
                          &PyTuple_Type, &reads)) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reads); i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(reads, i))) {
            PyErr_SetString(PyExc_TypeError, "record_init(): attribute names must be str");
            return NULL;
        }
    }
    PyObject *watched = PyTuple_New(N_WATCHED);
    if (watched == NULL) return NULL;
    for (int i = 0; i < N_WATCHED; i++) {
        PyObject *v = PyDict_GetItemString(globals, watched_names[i]);
        PyObject *pair = v == NULL ? NULL : Py_BuildValue("(sO)", watched_names[i], v);
        if (pair == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_NameError, "record_init(): fmel has no %s", watched_names[i]);
            }
            Py_DECREF(watched);
            return NULL;
        }
        PyTuple_SET_ITEM(watched, i, pair);
    }
#define WATCHED(i) PyTuple_GET_ITEM(PyTuple_GET_ITEM(watched, i), 1)
    PyObject *plain = WATCHED(0), *deferred = WATCHED(1), *pending = WATCHED(2);
    PyObject *epoch = WATCHED(5), *spd = WATCHED(6);
#undef WATCHED
    if (!PyType_Check(plain) || !PyType_Check(deferred) || !PyType_Check(pending) ||
        !PyType_IsSubtype((PyTypeObject *)plain, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)deferred, &PyTuple_Type) || !PyFloat_Check(epoch) ||
        !PyFloat_Check(spd)) {
        PyErr_SetString(PyExc_TypeError, "record_init(): the record classes must be tuple "
                                         "classes, the epoch constants floats");
        Py_DECREF(watched);
        return NULL;
    }
    PyObject *slots = PyTuple_New(N_SLOTS);
    if (slots == NULL) {
        Py_DECREF(watched);
        return NULL;
    }
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *descr = PyObject_GetAttrString(pending, slot_names[i]);
        if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type) {
            if (descr != NULL) {
                PyErr_Format(PyExc_TypeError, "record_init(): %s is not a slot of PendingReads",
                             slot_names[i]);
                Py_DECREF(descr);
            }
            Py_DECREF(slots);
            Py_DECREF(watched);
            return NULL;
        }
        PyTuple_SET_ITEM(slots, i, descr);
    }
#define KEEP(g, v) Py_XSETREF(g, Py_NewRef(v))
    KEEP(g_plain_record, plain);
    KEEP(g_deferred_record, deferred);
    KEEP(g_pending_type, pending);
    KEEP(g_absent, PyTuple_GET_ITEM(PyTuple_GET_ITEM(watched, 3), 1));
    KEEP(g_round_ms, PyTuple_GET_ITEM(PyTuple_GET_ITEM(watched, 4), 1));
    KEEP(g_epoch_obj, epoch);
    KEEP(g_seconds_obj, spd);
    KEEP(g_ind_key, ind);
    KEEP(g_fmel_globals, globals);
    KEEP(g_instance_reads, reads);
    Py_XSETREF(g_watched, watched);
    Py_XSETREF(g_pending_slots, slots);
    Py_XSETREF(g_read_buffer, (PyTypeObject *)Py_NewRef(rbuf));
    Py_XSETREF(g_tracker_type, (PyTypeObject *)Py_NewRef(tracker));
    Py_XSETREF(g_analyzer_type, (PyTypeObject *)Py_NewRef(analyzer));
#undef KEEP
    g_epoch_days = PyFloat_AsDouble(epoch);
    g_seconds_per_day = PyFloat_AsDouble(spd);
    g_globals_version = 0; /* looked up at the first bar */
    g_ready = 1;
    Py_RETURN_NONE;
}

int
fr_record_module_init(void)
{
#define INTERN(v, s)                                   \
    if ((v = PyUnicode_InternFromString(s)) == NULL) { \
        return -1;                                     \
    }
    INTERN(s_run_info, "run_info");
    INTERN(s__agent_vars, "_agent_vars");
    INTERN(s__agent_len, "_agent_len");
    INTERN(s__callback_items, "_callback_items");
    INTERN(s_tracker, "tracker");
    INTERN(s__strategy, "_strategy");
    INTERN(s__graph, "_graph");
    INTERN(s__lineiterators, "_lineiterators");
    INTERN(s__registered, "_registered");
    INTERN(s_reads, "reads");
    INTERN(s__defer, "_defer");
    INTERN(s__stale, "_stale");
    INTERN(s__events, "_events");
    INTERN(s__notes, "_notes");
    INTERN(s__reasoning, "_reasoning");
    INTERN(s__confidence, "_confidence");
    INTERN(s__held, "_held");
    INTERN(s__dtline, "_dtline");
    INTERN(s_array, "array");
    INTERN(s__idx, "_idx");
    INTERN(s_take, "take");
    INTERN(s__capture_c, "_capture_c");
    INTERN(s__captured, "_captured");
    INTERN(s_capture, "capture");
    INTERN(s__pending, "_pending");
    INTERN(s_append, "append");
    INTERN(s_popleft, "popleft");
    INTERN(s_done, "done");
    INTERN(s_strategy, "strategy");
    INTERN(s_broker, "broker");
    INTERN(s__getvalue, "_getvalue");
    INTERN(s_getcash, "getcash");
    INTERN(s__positions, "_positions");
    INTERN(s_decisions, "decisions");
    INTERN(s_writer, "writer");
    INTERN(s_submit, "submit");
    INTERN(s__keep, "_keep");
    INTERN(s_records, "records");
    INTERN(s__record_py, "_record_py");
    INTERN(s_HOLD, "HOLD");
    INTERN(s_time, "time");
    INTERN(s__summary, "_summary");
    INTERN(s_sync, "sync");
    INTERN(s__PENDING_KEEP, "_PENDING_KEEP");
    INTERN(s__notes_json, "_notes_json");
#undef INTERN
    if ((k_one = PyLong_FromLong(1)) == NULL) return -1;
    return 0;
}
