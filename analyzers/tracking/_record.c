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
 * instance dict where they are (fmel._compiled_record_fits: no class of it makes them data
 * descriptors), else as Python reads them (a class attribute, or the same AttributeError).
 * Taken once at record_init: the record classes, PendingReads and its slots, _round_ms.
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
static PyTypeObject *g_tracker_type = NULL; /* analyzers.tracking.AccessTracker */
static PyTypeObject *g_read_buffer = NULL; /* _fastread.ReadBuffer */
static PyObject *g_pending_slots = NULL;   /* PendingReads' slot descriptors, in s_slots order */
static double g_epoch_days = 0.0, g_seconds_per_day = 0.0;

static PyObject *s_run_info, *s__agent_vars, *s__agent_len, *s__callback_items, *s_tracker,
    *s__strategy, *s__graph, *s__lineiterators, *s__registered, *s_reads, *s__defer, *s__stale,
    *s__events, *s__notes, *s__reasoning, *s__confidence, *s__held, *s__dtline, *s_array, *s__idx,
    *s_take, *s__capture_c, *s__captured, *s_capture, *s__pending, *s_append, *s_popleft,
    *s_done, *s_resolve, *s_strategy, *s_broker, *s__getvalue, *s_getcash, *s__positions,
    *s_decisions, *s_writer, *s_submit, *s__keep, *s_records, *s__record_py, *s_HOLD, *s_time,
    *s__summary, *s_sync, *s__PENDING_KEEP;
static PyObject *k_one = NULL;
static int g_ready = 0;

/* the slots PendingReads.__init__ sets, in its order */
static const char *const slot_names[] = {"_tracker", "_reads", "_state", "_result", "_cols",
                                         "_lookaheads"};
#define N_SLOTS 6

/* d[key] as a new reference; NULL without an exception when missing. */
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

/* 1: the usual bar (see the top); 0: not; -1: an exception. */
static int
usual_bar(PyObject *d, PyObject *tracker, PyObject *td)
{
    /* AccessTracker's own sync() and capture() (what the C does in their place) */
    if (Py_TYPE(tracker) != g_tracker_type) return 0;
    int r = PyDict_Contains(td, s_sync);
    if (r == 0) r = PyDict_Contains(td, s_capture);
    if (r != 0) return r < 0 ? -1 : 0;
    r = callbacks_as_wrapped(d);
    if (r > 0) r = nothing_to_sync(td);
    if (r <= 0) return r;
    /* the reads: a ReadBuffer; a deferring analyzer needs the tags' sources fresh; the order
     * events a list; no note waiting (json.dumps: _record_py); a run */
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
    if (r > 0 && (r = owned(d, s__events, &v)) > 0) {
        r = PyList_CheckExact(v);
        Py_DECREF(v);
    }
    if (r > 0 && (r = owned(d, s__notes, &v)) > 0) {
        r = PyDict_CheckExact(v) && PyDict_GET_SIZE(v) == 0;
        Py_DECREF(v);
    }
    if (r > 0 && (r = owned(d, s__reasoning, &v)) > 0) Py_DECREF(v);
    if (r > 0 && (r = owned(d, s__confidence, &v)) > 0) Py_DECREF(v);
    if (r > 0 && (r = owned(d, s_run_info, &v)) > 0) {
        r = v != Py_None;
        Py_DECREF(v);
    }
    return r;
}

/* The bar time as fmel._round_ms((dt - BT_EPOCH_DAYS) * SECONDS_PER_DAY); NULL with 0
 * returned through *usual when the bar time is not an exact float (then nothing is done). */
static PyObject *
bar_time(PyObject *dtl, int *usual)
{
    *usual = 1;
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
    if (!PyFloat_CheckExact(x)) {
        Py_DECREF(x);
        *usual = 0;
        return NULL;
    }
    double posix = (PyFloat_AS_DOUBLE(x) - g_epoch_days) * g_seconds_per_day;
    Py_DECREF(x);
    double y = posix * 1000.0;
    if (y == y && -0x1p49 < y && y < 0x1p49) {
        double k = nearbyint(y); /* round-half-even, as Python's round() */
        double diff = y - k;
        if (-0.4 < diff && diff < 0.4) {
            return PyFloat_FromDouble(k != 0.0 ? k / 1000.0 : copysign(0.0, posix));
        }
    }
    PyObject *p = PyFloat_FromDouble(posix);
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
             *action = NULL, *reasoning = NULL, *confidence = NULL;
    if ((tracker = get_new(d, s_tracker)) == NULL) goto to_slow;
    PyObject **tdp = _PyObject_GetDictPtr(tracker);
    if (tdp == NULL || *tdp == NULL) goto to_slow;
    td = Py_NewRef(*tdp);
    int usual = usual_bar(d, tracker, td);
    if (usual < 0) goto fail;
    if (!usual) goto to_slow;
    PyObject *dtl = NULL;
    int has_dtl = owned(d, s__dtline, &dtl);
    if (has_dtl < 0) goto fail;
    if (has_dtl == 0) goto to_slow;
    bt = bar_time(dtl, &usual);
    Py_DECREF(dtl);
    if (bt == NULL && usual && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* _record_py reads it after taking the reads and events: it raises it there */
        PyErr_Clear();
        usual = 0;
    }
    if (!usual) goto to_slow;
    if (bt == NULL) goto fail;
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
    /* the bar's order events, as _record_py: the list replaced first, then summarised */
    PyObject *ev = attr(analyzer, d, s__events);
    if (ev == NULL) goto fail;
    if (PyList_CheckExact(ev) && PyList_GET_SIZE(ev)) {
        PyObject *fresh = PyList_New(0);
        if (fresh == NULL || PyObject_SetAttr(analyzer, s__events, fresh) < 0) {
            Py_XDECREF(fresh);
            Py_DECREF(ev);
            goto fail;
        }
        Py_DECREF(fresh);
        events = PyList_AsTuple(ev);
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
        if ((events = PyTuple_New(0)) == NULL) goto fail;
        action = Py_NewRef(s_HOLD);
    }
    /* (no notes: usual_bar) reasoning and confidence taken once */
    if ((reasoning = attr(analyzer, d, s__reasoning)) == NULL) goto fail;
    if ((confidence = attr(analyzer, d, s__confidence)) == NULL) goto fail;
    if (reasoning != Py_None || confidence != Py_None) {
        if (PyObject_SetAttr(analyzer, s__reasoning, Py_None) < 0 ||
            PyObject_SetAttr(analyzer, s__confidence, Py_None) < 0) {
            goto fail;
        }
    }
    PyObject *strategy = PyObject_GetAttr(analyzer, s_strategy);
    if (strategy == NULL) goto fail;
    broker = PyObject_GetAttr(strategy, s_broker);
    Py_DECREF(strategy);
    if (broker == NULL) goto fail;
    if ((held = attr(analyzer, d, s__held)) == NULL) goto fail;
    if ((decisions = attr(analyzer, d, s_decisions)) == NULL) goto fail;
    if ((ts = wall_time()) == NULL) goto fail;
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
                            positions, reasoning, confidence, Py_None};
    for (int i = 0; i < 16; i++) PyTuple_SET_ITEM(rec, i, Py_NewRef(fields[i]));
    /* self.decisions += 1: read again (what the calls above ran may have recorded too) */
    PyObject *now = PyObject_GetAttr(analyzer, s_decisions);
    if (now == NULL) goto fail;
    PyObject *next = PyNumber_InPlaceAdd(now, k_one);
    Py_DECREF(now);
    if (next == NULL) goto fail;
    int bad = PyObject_SetAttr(analyzer, s_decisions, next);
    Py_DECREF(next);
    if (bad < 0) goto fail;
    PyObject *writer = PyObject_GetAttr(analyzer, s_writer);
    if (writer == NULL) goto fail;
    if (writer != Py_None) {
        tmp = PyObject_CallMethodOneArg(writer, s_submit, rec);
        Py_DECREF(writer);
        if (tmp == NULL) goto fail;
    }
    else {
        Py_DECREF(writer);
        PyObject *keep = PyObject_GetAttr(analyzer, s__keep);
        if (keep == NULL) goto fail;
        int k = PyObject_IsTrue(keep);
        Py_DECREF(keep);
        if (k < 0) goto fail;
        if (k) {
            PyObject *records = PyObject_GetAttr(analyzer, s_records);
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
    Py_XDECREF(td);
    Py_XDECREF(tracker);
    Py_DECREF(d);
    return out;
}

PyObject *
fr_record_init(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *plain, *deferred, *pending, *absent, *ind, *round_ms, *globals, *rbuf, *tracker;
    double epoch, spd;
    if (!PyArg_ParseTuple(args, "O!O!O!OOOO!O!O!dd:record_init", &PyType_Type, &plain,
                          &PyType_Type, &deferred, &PyType_Type, &pending, &absent, &ind,
                          &round_ms, &PyDict_Type, &globals, &PyType_Type, &rbuf, &PyType_Type,
                          &tracker, &epoch, &spd)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)plain, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)deferred, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "record_init(): the record classes must be tuples");
        return NULL;
    }
    PyObject *slots = PyTuple_New(N_SLOTS);
    if (slots == NULL) return NULL;
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *descr = PyObject_GetAttrString(pending, slot_names[i]);
        if (descr == NULL) {
            Py_DECREF(slots);
            return NULL;
        }
        if (Py_TYPE(descr) != &PyMemberDescr_Type) {
            PyErr_Format(PyExc_TypeError, "record_init(): %s is not a slot of PendingReads",
                         slot_names[i]);
            Py_DECREF(descr);
            Py_DECREF(slots);
            return NULL;
        }
        PyTuple_SET_ITEM(slots, i, descr);
    }
#define KEEP(g, v) Py_XSETREF(g, Py_NewRef(v))
    KEEP(g_plain_record, plain);
    KEEP(g_deferred_record, deferred);
    KEEP(g_pending_type, pending);
    KEEP(g_absent, absent);
    KEEP(g_ind_key, ind);
    KEEP(g_round_ms, round_ms);
    KEEP(g_fmel_globals, globals);
    Py_XSETREF(g_pending_slots, slots);
    Py_XSETREF(g_read_buffer, (PyTypeObject *)Py_NewRef(rbuf));
    Py_XSETREF(g_tracker_type, (PyTypeObject *)Py_NewRef(tracker));
#undef KEEP
    g_epoch_days = epoch;
    g_seconds_per_day = spd;
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
    INTERN(s_resolve, "resolve");
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
#undef INTERN
    if ((k_one = PyLong_FromLong(1)) == NULL) return -1;
    return 0;
}
