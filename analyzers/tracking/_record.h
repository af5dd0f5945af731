/* FMEL's once-a-bar decision record in one C call (_record.c), registered in _fastread's
 * module by _fastread.c. */
#ifndef FMEL_RECORD_H
#define FMEL_RECORD_H
#include <Python.h>

/* record_bar(analyzer, stage): FMELAnalyzer._record_py's work for the usual bar. */
PyObject *fr_record_bar(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
/* record_init(fmel's globals(), IndType, ReadBuffer, AccessTracker, FMELAnalyzer,
 * the attribute names read from the analyzer's dict) */
PyObject *fr_record_init(PyObject *mod, PyObject *args);
/* interned names; -1 with an exception on failure */
int fr_record_module_init(void);
#endif
