/* blockd._dnstap_fast: the blocked path's dnstap encoder loop, in C.
 *
 * repeat_frames() is PayloadEncoder.repeat_streams() (blockd/dnstap_frames.py) without the
 * interpreter: for each repeated blocked query it joins the kept parts of its two frames with the
 * per-query fields (port, times, ID).  Everything that needs judgement stays in Python: the kept
 * parts are built by the `keep` callback on a miss, the time fields by `times` when the second
 * changes, and a batch holding a time outside the kept parts' 5-byte seconds field returns None so
 * that the caller encodes it in Python.  Per lookup (both frames) it takes about half the Python
 * loop's time (`python bench/dnstap_encode.py`; bench/RESULTS.md "dnstap" for the daemon's
 * figures).  The Python loop is the specification: a property test compares the two byte for byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t length;
    Py_ssize_t capacity;
} Buffer;

static int put(Buffer *buffer, const char *source, Py_ssize_t size)
{
    if (buffer->length + size > buffer->capacity) {
        Py_ssize_t capacity = buffer->capacity ? buffer->capacity : 65536;
        while (capacity < buffer->length + size) {
            capacity *= 2;
        }
        char *data = PyMem_Realloc(buffer->data, (size_t)capacity);
        if (data == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        buffer->data = data;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->length, source, (size_t)size);
    buffer->length += size;
    return 0;
}

static int put_bytes(Buffer *buffer, PyObject *object)
{
    if (!PyBytes_Check(object)) {
        PyErr_SetString(PyExc_TypeError, "repeat_frames: a part is not bytes");
        return -1;
    }
    return put(buffer, PyBytes_AS_STRING(object), PyBytes_GET_SIZE(object));
}

/* repeat_frames(events, kept_for, ports, with_query, times, keep, low, high) -> bytes | None
 *   events     list of (host, port, transport, query_id, repeat, at_ns)
 *   kept_for   dict (repeat, host, transport, len(port field)) -> kept parts (a 6-tuple)
 *   ports      mapping port -> its query_port field (a dict with __missing__)
 *   times      callable(second) -> (query time field up to the nanoseconds, response's)
 *   keep       callable(key, event) -> kept parts (stores them in kept_for)
 *   low, high  the seconds the kept parts can carry
 */
static PyObject *repeat_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "repeat_frames takes 8 arguments");
        return NULL;
    }
    PyObject *events = args[0], *kept_for = args[1], *ports = args[2], *times = args[4], *keep = args[5];
    int with_query = PyObject_IsTrue(args[3]);
    long long low = PyLong_AsLongLong(args[6]);
    long long high = PyLong_AsLongLong(args[7]);
    if (with_query < 0 || PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_Check(events) || !PyDict_Check(kept_for)) {
        PyErr_SetString(PyExc_TypeError, "repeat_frames: events must be a list and kept_for a dict");
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    PyObject *fields = NULL; /* the (query, response) time fields of `current` */
    PyObject *query_second = NULL, *response_second = NULL;
    long long current = -1;
    Py_ssize_t count = PyList_GET_SIZE(events);
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *event = PyList_GET_ITEM(events, index);
        if (!PyTuple_Check(event) || PyTuple_GET_SIZE(event) != 6) {
            PyErr_SetString(PyExc_TypeError, "repeat_frames: an event is not a 6-tuple");
            goto fail;
        }
        PyObject *host = PyTuple_GET_ITEM(event, 0), *port = PyTuple_GET_ITEM(event, 1);
        PyObject *transport = PyTuple_GET_ITEM(event, 2), *query_id = PyTuple_GET_ITEM(event, 3);
        PyObject *repeat = PyTuple_GET_ITEM(event, 4);
        long long at_ns = PyLong_AsLongLong(PyTuple_GET_ITEM(event, 5));
        if (at_ns == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                goto fail;
            }
            PyErr_Clear(); /* a time past 2262: outside what the kept parts carry, as below */
            at_ns = -1;
        }
        long long second = at_ns / 1000000000LL;
        unsigned long nano = (unsigned long)(at_ns % 1000000000LL);
        if (second != current) {
            if (at_ns < 0 || second < low || second >= high) {
                /* Outside what the kept parts can carry: the caller encodes this batch in Python. */
                PyMem_Free(buffer.data);
                Py_XDECREF(fields);
                Py_RETURN_NONE;
            }
            PyObject *second_object = PyLong_FromLongLong(second);
            if (second_object == NULL) {
                goto fail;
            }
            PyObject *result = PyObject_CallOneArg(times, second_object);
            Py_DECREF(second_object);
            if (result == NULL) {
                goto fail;
            }
            if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
                Py_DECREF(result);
                PyErr_SetString(PyExc_TypeError, "repeat_frames: times() must return a 2-tuple");
                goto fail;
            }
            Py_XDECREF(fields);
            fields = result;
            query_second = PyTuple_GET_ITEM(fields, 0);
            response_second = PyTuple_GET_ITEM(fields, 1);
            current = second;
        }
        PyObject *port_field = PyObject_GetItem(ports, port); /* new reference; fills the cache on a miss */
        if (port_field == NULL) {
            goto fail;
        }
        if (!PyBytes_Check(port_field)) {
            Py_DECREF(port_field);
            PyErr_SetString(PyExc_TypeError, "repeat_frames: a port field is not bytes");
            goto fail;
        }
        PyObject *size = PyLong_FromSsize_t(PyBytes_GET_SIZE(port_field));
        PyObject *key = size ? PyTuple_Pack(4, repeat, host, transport, size) : NULL;
        Py_XDECREF(size);
        if (key == NULL) {
            Py_DECREF(port_field);
            goto fail;
        }
        PyObject *kept = PyDict_GetItemWithError(kept_for, key); /* borrowed */
        if (kept != NULL) {
            Py_INCREF(kept);
        } else if (!PyErr_Occurred()) {
            kept = PyObject_CallFunctionObjArgs(keep, key, event, NULL);
        }
        Py_DECREF(key);
        if (kept == NULL) {
            Py_DECREF(port_field);
            goto fail;
        }
        if (!PyTuple_Check(kept) || PyTuple_GET_SIZE(kept) != 6) {
            Py_DECREF(kept);
            Py_DECREF(port_field);
            PyErr_SetString(PyExc_TypeError, "repeat_frames: kept parts must be a 6-tuple");
            goto fail;
        }
        /* protobuf fixed32: little-endian */
        char nanoseconds[4] = {(char)(nano & 0xff), (char)((nano >> 8) & 0xff), (char)((nano >> 16) & 0xff),
                               (char)((nano >> 24) & 0xff)};
        int failed = 0;
        if (with_query) { /* the query frame up to its per-query fields, its length field, ... */
            failed = put_bytes(&buffer, PyTuple_GET_ITEM(kept, 1)) || put_bytes(&buffer, port_field) ||
                     put_bytes(&buffer, query_second) || put(&buffer, nanoseconds, 4) ||
                     put_bytes(&buffer, PyTuple_GET_ITEM(kept, 2)) || put_bytes(&buffer, query_id);
        }
        /* the query after its ID (with_query) and the response frame's head, its length field, the
         * response after its ID */
        failed = failed || put_bytes(&buffer, PyTuple_GET_ITEM(kept, 3)) || put_bytes(&buffer, port_field) ||
                 put_bytes(&buffer, query_second) || put(&buffer, nanoseconds, 4) ||
                 put_bytes(&buffer, response_second) || put(&buffer, nanoseconds, 4) ||
                 put_bytes(&buffer, PyTuple_GET_ITEM(kept, 4)) || put_bytes(&buffer, query_id) ||
                 put_bytes(&buffer, PyTuple_GET_ITEM(kept, 5));
        Py_DECREF(kept);
        Py_DECREF(port_field);
        if (failed) {
            goto fail;
        }
    }
    PyObject *frames = PyBytes_FromStringAndSize(buffer.data ? buffer.data : "", buffer.length);
    PyMem_Free(buffer.data);
    Py_XDECREF(fields);
    return frames;
fail:
    PyMem_Free(buffer.data);
    Py_XDECREF(fields);
    return NULL;
}

static PyMethodDef methods[] = {
    {"repeat_frames", (PyCFunction)(void (*)(void))repeat_frames, METH_FASTCALL,
     "Repeated blocked queries as dnstap data frames (see blockd.dnstap_frames.repeat_streams)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blockd._dnstap_fast", "The blocked path's dnstap encoder loop, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__dnstap_fast(void)
{
    return PyModule_Create(&module);
}
