/* chunkvol.format.fast: C versions of the per-request hot path's pure functions of
 * format/record.py and format/group_map.py. The Python functions stay the reference
 * (record.REFERENCE, group_map.REFERENCE; tests/format/test_fast.py compares both).
 *
 * Each function does the inputs the hot path gives it itself: buffers of unsigned bytes
 * (bytes, bytearray, memoryview, mmap), ints in range, well-formed group states. Anything
 * else (another type, an int struct would refuse, a position off the buffer, a bad call) goes
 * to the Python function it mirrors, before anything is written, so that results and
 * exceptions are the Python ones for every input without copying every corner of struct,
 * memoryview slicing and argument parsing here.
 *
 * Built by the Makefile (make install) against /usr/bin/python3, which nbdkit embeds.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Header-only XXH3 (Debian's libxxhash-dev, no library to link). Built for baseline x86-64
 * it hashes long inputs with SSE2, ~4x slower on a 4 KiB block than the xxhash package
 * (which picks AVX2 or AVX-512 at run time): so, as xxHash's own xxh_x86dispatch.c does,
 * the long-input loop is also compiled for AVX2 and AVX-512 and picked at import by the
 * CPU. Same function, same values; inputs up to 240 bytes (headers) take scalar code. */
#define XXH_INLINE_ALL
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HASH_DISPATCH 1
#define XXH_X86DISPATCH /* as xxh_x86dispatch.c: accumulators aligned for any variant */
#define XXH_DISPATCH_AVX2 1
#define XXH_DISPATCH_AVX512 1
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#define XXH_TARGET_AVX512 __attribute__((__target__("avx512f")))
#include <immintrin.h> /* the vector types, which xxhash.h includes only for a vector build */
#endif
#include <xxhash.h>

#ifdef HASH_DISPATCH
XXH_NO_INLINE XXH_TARGET_AVX2 XXH64_hash_t
hash_long_avx2(const void *XXH_RESTRICT input, size_t len, XXH64_hash_t seed, const xxh_u8 *XXH_RESTRICT secret,
               size_t secret_size)
{
    return XXH3_hashLong_64b_internal(input, len, XXH3_kSecret, sizeof(XXH3_kSecret), XXH3_accumulate_512_avx2,
                                      XXH3_scrambleAcc_avx2);
}

XXH_NO_INLINE XXH_TARGET_AVX512 XXH64_hash_t
hash_long_avx512(const void *XXH_RESTRICT input, size_t len, XXH64_hash_t seed, const xxh_u8 *XXH_RESTRICT secret,
                 size_t secret_size)
{
    return XXH3_hashLong_64b_internal(input, len, XXH3_kSecret, sizeof(XXH3_kSecret), XXH3_accumulate_512_avx512,
                                      XXH3_scrambleAcc_avx512);
}
#endif

static XXH3_hashLong64_f hash_long = XXH3_hashLong_64b_default; /* set by PyInit_fast */
static const char *hash_variant = "default";

/* xxhash.xxh3_64_intdigest */
static inline uint64_t
xxh3(const void *data, size_t length)
{
    return XXH3_64bits_internal(data, length, 0, XXH3_kSecret, sizeof(XXH3_kSecret), hash_long);
}

/* xxh3 with each long-input variant this CPU runs, for the tests: ((name, hash), ...). */
static PyObject *
fast_xxh3_variants(PyObject *module, PyObject *arg)
{
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *names[3] = {"default"};
    XXH3_hashLong64_f functions[3] = {XXH3_hashLong_64b_default};
    int count = 1;
#ifdef HASH_DISPATCH
    if (__builtin_cpu_supports("avx2")) {
        names[count] = "avx2";
        functions[count++] = hash_long_avx2;
    }
    if (__builtin_cpu_supports("avx512f")) {
        names[count] = "avx512";
        functions[count++] = hash_long_avx512;
    }
#endif
    PyObject *result = PyTuple_New(count);
    for (int i = 0; result != NULL && i < count; i++) {
        uint64_t hash = XXH3_64bits_internal(data.buf, data.len, 0, XXH3_kSecret, sizeof(XXH3_kSecret), functions[i]);
        PyObject *pair = Py_BuildValue("(sK)", names[i], (unsigned long long)hash);
        if (pair == NULL)
            Py_CLEAR(result);
        else
            PyTuple_SET_ITEM(result, i, pair);
    }
    PyBuffer_Release(&data);
    return result;
}

/* The record format (format/record.py); setup_record checks record.py says the same. */
#define MAGIC "CVrc"
#define VERSION 1
#define HEADER_BODY 64
#define HEADER_SIZE 72
#define BLOCK_SIZE 4096
#define GROUP_BLOCKS 16
#define CHECKSUM_BYTES 8
#define MAX_PAYLOAD (BLOCK_SIZE * GROUP_BLOCKS + 65536)
#define TYPE_EXTENT 1
#define HOLE 0xFF

/* Set by setup_record (record.py) and setup_group_map (group_map.py) at their import. */
static PyObject *header_class;      /* record.RecordHeader */
static int header_plain;            /* RecordHeader is tuple with names: made and read as a tuple */
static PyObject *corruption_error;  /* errors.CorruptionError */
static PyObject *format_error;      /* errors.FormatError */
static unsigned char known_types[256];
static PyObject *py_encode_header_into, *py_encode_record_into, *py_block_table, *py_decode_header,
    *py_verify_blocks;
static PyObject *full_slots, *empty_state; /* group_map.FULL_SLOTS, group_map.EMPTY_STATE */
static PyObject *py_apply_write, *py_apply_hole, *py_encode_state, *py_decode_state;
static PyTypeObject *mmap_type;

/* ---- helpers --------------------------------------------------------------------------- */

static inline void put16(unsigned char *p, uint64_t v) { p[0] = v; p[1] = v >> 8; }
static inline void put32(unsigned char *p, uint64_t v) { put16(p, v); put16(p + 2, v >> 16); }
static inline void put64(unsigned char *p, uint64_t v) { put32(p, v); put32(p + 4, v >> 32); }
static inline uint32_t get16(const unsigned char *p) { return p[0] | (uint32_t)p[1] << 8; }
static inline uint32_t get32(const unsigned char *p) { return get16(p) | get16(p + 2) << 16; }
static inline uint64_t get64(const unsigned char *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

/* The Python function `reference` with the call as it came (vectorcall: keyword values
 * follow the positional ones in args). */
static PyObject *
fallback(PyObject *reference, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (reference == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "chunkvol.format.fast is not set up (import chunkvol.format.record)");
        return NULL;
    }
    return PyObject_Vectorcall(reference, args, nargs, kwnames);
}

/* out[0..count) from positional arguments, then keywords by `names`; None for a missing
 * optional one. 0 when the call does not fit (too many, a required one missing, an unknown
 * or repeated name): the caller falls back, and Python raises its own TypeError. */
static int
parse(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
      int count, int required, PyObject **out)
{
    if (nargs > count)
        return 0;
    for (int i = 0; i < count; i++)
        out[i] = i < nargs ? args[i] : NULL;
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            int i = 0;
            while (i < count && PyUnicode_CompareWithASCIIString(name, names[i]) != 0)
                i++;
            if (i == count || out[i] != NULL)
                return 0;
            out[i] = args[nargs + k];
        }
    }
    for (int i = 0; i < count; i++) {
        if (out[i] == NULL) {
            if (i < required)
                return 0;
            out[i] = Py_None;
        }
    }
    return 1;
}

/* A C-contiguous buffer of unsigned bytes from bytes, bytearray, memoryview or mmap: then
 * len(obj) is its size and memoryview(obj) slices it byte by byte, as the Python code
 * assumes. 1 with `view` held; 0 (no error set) for anything else: fall back. */
static int
byte_buffer(PyObject *obj, Py_buffer *view, int writable)
{
    if (!(PyBytes_CheckExact(obj) || PyByteArray_CheckExact(obj) || PyMemoryView_Check(obj)
          || Py_IS_TYPE(obj, mmap_type)))
        return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_ND | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear(); /* read-only, released, closed, not contiguous: Python says which */
        view->obj = NULL;
        return 0;
    }
    if (view->ndim != 1 || view->itemsize != 1 || (view->format != NULL && strcmp(view->format, "B") != 0)) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* Release what byte_buffer got (a zeroed or released Py_buffer is nothing to release). */
static void
release(Py_buffer *first, Py_buffer *second, Py_buffer *third)
{
    PyBuffer_Release(first);
    PyBuffer_Release(second);
    PyBuffer_Release(third);
}

/* An int (or int subclass: struct packs an IntEnum by its value) in [0, max]. 0 (no error
 * set) otherwise: struct.pack_into would raise, so fall back and let it. */
static int
uint_arg(PyObject *obj, uint64_t max, uint64_t *out)
{
    if (!PyLong_Check(obj))
        return 0;
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (value > max)
        return 0;
    *out = value;
    return 1;
}

/* An exact int in [0, PY_SSIZE_T_MAX] (a subclass could change the arithmetic Python does
 * on it); 0 (no error set) otherwise. */
static int
index_arg(PyObject *obj, Py_ssize_t *out)
{
    if (!PyLong_CheckExact(obj))
        return 0;
    Py_ssize_t value = PyLong_AsSsize_t(obj);
    if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (value < 0)
        return 0;
    *out = value;
    return 1;
}

/* raise cls(message, path, offset), as `raise CorruptionError(message, path, offset)`. */
static PyObject *
raise_error(PyObject *cls, PyObject *message, PyObject *path, PyObject *offset)
{
    if (message == NULL)
        return NULL;
    PyObject *error = PyObject_CallFunctionObjArgs(cls, message, path, offset, NULL);
    Py_DECREF(message);
    if (error != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(error), error);
        Py_DECREF(error);
    }
    return NULL;
}

/* ---- record.py ------------------------------------------------------------------------- */

static const char *const encode_names[] = {"buffer", "position", "record_type", "flags", "volume_id", "payload",
                                           "origin_node", "origin_sequence", "hlc", "offset_bytes", "length_bytes",
                                           "table"};

/* The header fields of an encode call, checked as struct would. */
typedef struct {
    Py_ssize_t position;
    uint64_t record_type, flags, volume_id, origin_node, origin_sequence, hlc, offset_bytes, length_bytes;
} header_fields;

static int
header_args(PyObject **a, header_fields *h)
{
    return index_arg(a[1], &h->position) && uint_arg(a[2], 0xFF, &h->record_type)
        && uint_arg(a[3], 0xFFFF, &h->flags) && uint_arg(a[4], 0xFFFFFFFF, &h->volume_id)
        && uint_arg(a[6], UINT64_MAX, &h->origin_node) && uint_arg(a[7], UINT64_MAX, &h->origin_sequence)
        && uint_arg(a[8], UINT64_MAX, &h->hlc) && uint_arg(a[9], UINT64_MAX, &h->offset_bytes)
        && uint_arg(a[10], UINT64_MAX, &h->length_bytes);
}

/* HEADER_BODY.pack_into, then the header checksum over those 64 bytes. */
static void
write_header(unsigned char *p, const header_fields *h, uint64_t stored_length, uint64_t payload_checksum)
{
    memcpy(p, MAGIC, 4);
    p[4] = VERSION;
    p[5] = (unsigned char)h->record_type;
    put16(p + 6, h->flags);
    put32(p + 8, h->volume_id);
    put32(p + 12, stored_length);
    put64(p + 16, h->origin_node);
    put64(p + 24, h->origin_sequence);
    put64(p + 32, h->hlc);
    put64(p + 40, h->offset_bytes);
    put64(p + 48, h->length_bytes);
    put64(p + 56, payload_checksum);
    put64(p + HEADER_BODY, xxh3(p, HEADER_BODY));
}

/* record.encode_header_into */
static PyObject *
fast_encode_header_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[12];
    header_fields h;
    Py_buffer out = {0}, payload = {0}, table = {0};
    uint64_t stored_length;
    if (py_encode_header_into == NULL || !parse(args, nargs, kwnames, encode_names, 12, 11, a)
        || !header_args(a, &h))
        goto python;
    int has_table = a[11] != Py_None;
    if (!byte_buffer(a[5], &payload, 0) || (has_table && !byte_buffer(a[11], &table, 0)))
        goto python;
    stored_length = (uint64_t)payload.len + (uint64_t)table.len;
    /* Past u32 or past the buffer's end, struct.error (maybe after writing the body). */
    if (stored_length > 0xFFFFFFFF || !byte_buffer(a[0], &out, 1) || h.position > out.len - HEADER_SIZE)
        goto python;
    write_header((unsigned char *)out.buf + h.position, &h, stored_length,
                 has_table ? xxh3(table.buf, table.len) : xxh3(payload.buf, payload.len));
    release(&out, &payload, &table);
    return PyLong_FromLong(HEADER_SIZE);
python:
    release(&out, &payload, &table);
    return fallback(py_encode_header_into, args, nargs, kwnames);
}

/* record.encode_record_into: the header, then table (may be empty) and payload after it. */
static PyObject *
fast_encode_record_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[12];
    header_fields h;
    Py_buffer out = {0}, payload = {0}, table = {0};
    Py_ssize_t size;
    if (py_encode_record_into == NULL || !parse(args, nargs, kwnames, encode_names, 12, 12, a)
        || !header_args(a, &h) || !byte_buffer(a[11], &table, 0) || !byte_buffer(a[5], &payload, 0))
        goto python;
    uint64_t stored_length = (uint64_t)table.len + (uint64_t)payload.len;
    if (stored_length > 0xFFFFFFFF || !byte_buffer(a[0], &out, 1))
        goto python;
    /* Off the end, Python's slice assignment would fail, or grow a bytearray. */
    size = HEADER_SIZE + (Py_ssize_t)stored_length;
    if (h.position > out.len - size)
        goto python;
    unsigned char *p = (unsigned char *)out.buf + h.position;
    /* `table or None`: with an empty table the payload has the checksum. */
    write_header(p, &h, stored_length, table.len ? xxh3(table.buf, table.len) : xxh3(payload.buf, payload.len));
    memmove(p + HEADER_SIZE, table.buf, table.len);
    memmove(p + HEADER_SIZE + table.len, payload.buf, payload.len);
    release(&out, &payload, &table);
    return PyLong_FromSsize_t(size);
python:
    release(&out, &payload, &table);
    return fallback(py_encode_record_into, args, nargs, kwnames);
}

/* record.block_table */
static PyObject *
fast_block_table(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data"};
    PyObject *a[1];
    Py_buffer data;
    if (py_block_table == NULL || !parse(args, nargs, kwnames, names, 1, 1, a) || !byte_buffer(a[0], &data, 0))
        return fallback(py_block_table, args, nargs, kwnames);
    Py_ssize_t count = data.len / BLOCK_SIZE;
    if (count > GROUP_BLOCKS) { /* BLOCK_TABLES[count]: IndexError */
        PyBuffer_Release(&data);
        return fallback(py_block_table, args, nargs, kwnames);
    }
    PyObject *table = PyBytes_FromStringAndSize(NULL, count * CHECKSUM_BYTES);
    if (table != NULL) {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(table);
        for (Py_ssize_t i = 0; i < count; i++)
            put64(out + i * CHECKSUM_BYTES, xxh3((const char *)data.buf + i * BLOCK_SIZE, BLOCK_SIZE));
    }
    PyBuffer_Release(&data);
    return table;
}

/* record.decode_header */
static PyObject *
fast_decode_header(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"view", "path", "offset"};
    PyObject *a[3];
    Py_buffer view;
    if (py_decode_header == NULL || !parse(args, nargs, kwnames, names, 3, 1, a) || !byte_buffer(a[0], &view, 0))
        return fallback(py_decode_header, args, nargs, kwnames);
    PyObject *path = a[1], *offset = a[2];
    unsigned char p[HEADER_SIZE];
    Py_ssize_t length = view.len;
    if (length >= HEADER_SIZE)
        memcpy(p, view.buf, HEADER_SIZE);
    PyBuffer_Release(&view);
    if (length < HEADER_SIZE)
        return raise_error(corruption_error, PyUnicode_FromString("truncated record header"), path, offset);
    if (memcmp(p, MAGIC, 4) != 0)
        return raise_error(corruption_error, PyUnicode_FromString("bad record magic"), path, offset);
    if (xxh3(p, HEADER_BODY) != get64(p + HEADER_BODY))
        return raise_error(corruption_error, PyUnicode_FromString("record header checksum mismatch"), path, offset);
    if (p[4] != VERSION)
        return raise_error(format_error, PyUnicode_FromFormat("unknown record version %u", (unsigned)p[4]), path,
                           offset);
    if (!known_types[p[5]])
        return raise_error(format_error, PyUnicode_FromFormat("unknown record type %u", (unsigned)p[5]), path,
                           offset);
    if (get32(p + 12) > MAX_PAYLOAD && p[5] == TYPE_EXTENT)
        return raise_error(corruption_error,
                           PyUnicode_FromFormat("record payload length %lu over the limit", (unsigned long)get32(p + 12)),
                           path, offset);
    /* RecordHeader(fields[2:12]) */
    PyObject *fields[10];
    fields[0] = PyLong_FromUnsignedLong(p[5]);
    fields[1] = PyLong_FromUnsignedLong(get16(p + 6));
    fields[2] = PyLong_FromUnsignedLong(get32(p + 8));
    fields[3] = PyLong_FromUnsignedLong(get32(p + 12));
    for (int i = 0; i < 6; i++)
        fields[4 + i] = PyLong_FromUnsignedLongLong(get64(p + 16 + 8 * i));
    PyObject *result = NULL;
    for (int i = 0; i < 10; i++)
        if (fields[i] == NULL)
            goto done;
    if (header_plain) { /* what tuple.__new__(RecordHeader, fields) does, without the temporary tuple */
        result = ((PyTypeObject *)header_class)->tp_alloc((PyTypeObject *)header_class, 10);
        if (result != NULL)
            for (int i = 0; i < 10; i++) {
                PyTuple_SET_ITEM(result, i, fields[i]);
                fields[i] = NULL;
            }
    } else {
        PyObject *tuple = PyTuple_New(10);
        if (tuple != NULL) {
            for (int i = 0; i < 10; i++) {
                PyTuple_SET_ITEM(tuple, i, fields[i]);
                fields[i] = NULL;
            }
            result = PyObject_CallOneArg(header_class, tuple);
            Py_DECREF(tuple);
        }
    }
done:
    for (int i = 0; i < 10; i++)
        Py_XDECREF(fields[i]);
    return result;
}

/* record.verify_blocks */
static PyObject *
fast_verify_blocks(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"header", "table", "blocks", "first_block", "block_count", "path", "offset"};
    PyObject *a[7], *message = NULL;
    Py_buffer table = {0}, blocks = {0}, none = {0};
    Py_ssize_t first, count, sums;
    if (py_verify_blocks == NULL || !parse(args, nargs, kwnames, names, 7, 5, a) || !index_arg(a[3], &first)
        || !index_arg(a[4], &count))
        goto python;
    PyObject *header = a[0];
    /* header[9] of a tuple (or of a RecordHeader, which indexes as one), an exact int. */
    if (!(PyTuple_CheckExact(header) || (header_plain && Py_IS_TYPE(header, (PyTypeObject *)header_class)))
        || PyTuple_GET_SIZE(header) < 10 || !PyLong_CheckExact(PyTuple_GET_ITEM(header, 9))
        || !byte_buffer(a[1], &table, 0) || !byte_buffer(a[2], &blocks, 0))
        goto python;
    /* BLOCK_TABLES[len // 8].unpack(table) and sums[first + index] must work. */
    sums = table.len / CHECKSUM_BYTES;
    if (table.len % CHECKSUM_BYTES || sums > GROUP_BLOCKS || count > sums || first > sums - count)
        goto python;
    /* An int outside u64 equals no checksum: a mismatch, as in Python. */
    unsigned long long expected = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(header, 9));
    int outside = expected == (unsigned long long)-1 && PyErr_Occurred();
    if (outside)
        PyErr_Clear();
    const unsigned char *sum = table.buf;
    const char *data = blocks.buf;
    if (outside || xxh3(sum, table.len) != expected) {
        message = PyUnicode_FromString("record block table checksum mismatch");
        goto corrupt;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        /* view[index * 4096:(index + 1) * 4096], cut short at the end of `blocks` */
        Py_ssize_t start = Py_MIN(index * BLOCK_SIZE, blocks.len);
        Py_ssize_t end = Py_MIN(start + BLOCK_SIZE, blocks.len);
        if (xxh3(data + start, end - start) != get64(sum + (first + index) * CHECKSUM_BYTES)) {
            message = PyUnicode_FromFormat("record block %zd checksum mismatch", first + index);
            goto corrupt;
        }
    }
    release(&table, &blocks, &none);
    Py_RETURN_NONE;
corrupt:
    release(&table, &blocks, &none);
    return raise_error(corruption_error, message, a[5], a[6]);
python:
    release(&table, &blocks, &none);
    return fallback(py_verify_blocks, args, nargs, kwnames);
}

/* record.py's constants, its RecordHeader and errors, and its reference functions (to fall
 * back on), at its import. */
static PyObject *
fast_setup_record(PyObject *module, PyObject *args)
{
    PyObject *cls, *corruption, *format, *types, *constants, *reference;
    if (!PyArg_ParseTuple(args, "O!OOOOO!:setup_record", &PyType_Type, &cls, &corruption, &format, &types,
                          &constants, &PyDict_Type, &reference))
        return NULL;
    PyObject *mine = Py_BuildValue("(y#iiiiiii)", MAGIC, (Py_ssize_t)4, VERSION, HEADER_SIZE, BLOCK_SIZE,
                                   GROUP_BLOCKS, CHECKSUM_BYTES, MAX_PAYLOAD, TYPE_EXTENT);
    if (mine == NULL)
        return NULL;
    int same = PyObject_RichCompareBool(mine, constants, Py_EQ);
    Py_DECREF(mine);
    if (same < 0)
        return NULL;
    if (!same) {
        PyErr_SetString(PyExc_ImportError, "chunkvol.format.fast was built for another record format: rebuild it "
                                           "(make install)");
        return NULL;
    }
    unsigned char types_seen[256] = {0};
    PyObject *iterator = PyObject_GetIter(types), *item;
    if (iterator == NULL)
        return NULL;
    while ((item = PyIter_Next(iterator)) != NULL) {
        long value = PyLong_AsLong(item);
        Py_DECREF(item);
        if (value == -1 && PyErr_Occurred())
            break;
        if (value >= 0 && value < 256) /* a record_type byte can be no other */
            types_seen[value] = 1;
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred())
        return NULL;
    const char *functions[] = {"encode_header_into", "encode_record_into", "block_table", "decode_header",
                               "verify_blocks"};
    PyObject **slots[] = {&py_encode_header_into, &py_encode_record_into, &py_block_table, &py_decode_header,
                          &py_verify_blocks};
    for (int i = 0; i < 5; i++) {
        PyObject *function = PyDict_GetItemString(reference, functions[i]);
        if (function == NULL) {
            PyErr_Format(PyExc_KeyError, "setup_record: no reference %s", functions[i]);
            return NULL;
        }
        Py_INCREF(function);
        Py_XSETREF(*slots[i], function);
    }
    memcpy(known_types, types_seen, sizeof known_types);
    PyTypeObject *type = (PyTypeObject *)cls;
    /* Built by tuple.__new__ and indexed as a tuple (no __new__, __init__ or __getitem__ of
     * its own; header[9] goes to mp_subscript): decode_header may fill one directly and
     * verify_blocks index it. */
    header_plain = PyType_IsSubtype(type, &PyTuple_Type) && type->tp_new == PyTuple_Type.tp_new
        && type->tp_init == PyBaseObject_Type.tp_init && type->tp_as_mapping != NULL
        && type->tp_as_mapping->mp_subscript == PyTuple_Type.tp_as_mapping->mp_subscript;
    Py_INCREF(cls);
    Py_XSETREF(header_class, cls);
    Py_INCREF(corruption);
    Py_XSETREF(corruption_error, corruption);
    Py_INCREF(format);
    Py_XSETREF(format_error, format);
    Py_RETURN_NONE;
}

/* ---- group_map.py ---------------------------------------------------------------------- */

/* group_map._renumber: refs in order of first use, an equal ref counted once (found as a
 * dict finds a key: same object, or same hash and ==). 1 done, 0 a slot names no ref
 * (Python's IndexError: fall back), -1 error. */
static int
renumber(const unsigned char *slots, PyObject *refs, Py_ssize_t first, Py_ssize_t end, PyObject *new_ref,
         PyObject **result)
{
    PyObject *found[GROUP_BLOCKS];
    Py_hash_t hashes[GROUP_BLOCKS];
    int used = 0;
    unsigned char out[GROUP_BLOCKS];
    for (Py_ssize_t block = 0; block < GROUP_BLOCKS; block++) {
        PyObject *ref;
        int within;
        if (first <= block && block < end) {
            if (new_ref == Py_None) {
                out[block] = HOLE;
                continue;
            }
            ref = new_ref;
            within = (int)(block - first);
        } else {
            unsigned char slot = slots[block];
            if (slot == HOLE) {
                out[block] = HOLE;
                continue;
            }
            if ((slot >> 4) >= PyTuple_GET_SIZE(refs))
                return 0;
            ref = PyTuple_GET_ITEM(refs, slot >> 4);
            within = slot & 0x0F;
        }
        Py_hash_t hash = PyObject_Hash(ref);
        if (hash == -1)
            return -1;
        int index = 0;
        for (; index < used; index++) {
            if (found[index] == ref)
                break;
            if (hashes[index] == hash) {
                int equal = PyObject_RichCompareBool(found[index], ref, Py_EQ);
                if (equal < 0)
                    return -1;
                if (equal)
                    break;
            }
        }
        if (index == used) { /* at most 16: the new run and 16 - count other slots */
            if (used == GROUP_BLOCKS)
                return 0;
            found[used] = ref;
            hashes[used++] = hash;
        }
        out[block] = (unsigned char)(index << 4 | within);
    }
    PyObject *new_refs = PyTuple_New(used);
    if (new_refs == NULL)
        return -1;
    for (int i = 0; i < used; i++) {
        Py_INCREF(found[i]);
        PyTuple_SET_ITEM(new_refs, i, found[i]);
    }
    *result = Py_BuildValue("(y#N)", (const char *)out, (Py_ssize_t)GROUP_BLOCKS, new_refs);
    return *result == NULL ? -1 : 1;
}

/* group_map.apply_write (new_ref a ref) and apply_hole (new_ref None), from after their
 * whole-group case: group_map._rebuild. */
static PyObject *
rebuild(PyObject *reference, PyObject *const *args, Py_ssize_t nargs, PyObject *state, PyObject *first_arg,
        PyObject *count_arg, PyObject *new_ref)
{
    Py_ssize_t first, count;
    if (!index_arg(first_arg, &first) || !index_arg(count_arg, &count) || first > GROUP_BLOCKS
        || count > GROUP_BLOCKS - first)
        return fallback(reference, args, nargs, NULL);
    PyObject *slots_object, *refs;
    if (state == Py_None) {
        slots_object = PyTuple_GET_ITEM(empty_state, 0);
        refs = PyTuple_GET_ITEM(empty_state, 1);
    } else {
        /* `slots, refs = state`: a 2-tuple of 16 bytes and a tuple, else Python decides */
        if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 2)
            return fallback(reference, args, nargs, NULL);
        slots_object = PyTuple_GET_ITEM(state, 0);
        refs = PyTuple_GET_ITEM(state, 1);
        if (!PyBytes_CheckExact(slots_object) || PyBytes_GET_SIZE(slots_object) != GROUP_BLOCKS
            || !PyTuple_CheckExact(refs))
            return fallback(reference, args, nargs, NULL);
    }
    const unsigned char *slots = (const unsigned char *)PyBytes_AS_STRING(slots_object);
    Py_ssize_t end = first + count;
    Py_ssize_t ref_count = PyTuple_GET_SIZE(refs);
    unsigned used = 0; /* record indexes the slots outside the run use */
    for (Py_ssize_t block = 0; block < GROUP_BLOCKS; block++)
        if ((block < first || block >= end) && slots[block] != HOLE)
            used |= 1u << (slots[block] >> 4);
    if (__builtin_popcount(used) == ref_count && (new_ref == Py_None || ref_count < GROUP_BLOCKS)) {
        /* Every old ref still used: keep them in place. */
        unsigned char out[GROUP_BLOCKS];
        memcpy(out, slots, GROUP_BLOCKS);
        for (Py_ssize_t block = first; block < end; block++)
            out[block] = new_ref == Py_None ? HOLE : (unsigned char)(ref_count << 4 | (block - first));
        if (new_ref == Py_None)
            return Py_BuildValue("(y#O)", (const char *)out, (Py_ssize_t)GROUP_BLOCKS, refs);
        PyObject *new_refs = PyTuple_New(ref_count + 1);
        if (new_refs == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < ref_count; i++) {
            PyObject *item = PyTuple_GET_ITEM(refs, i);
            Py_INCREF(item);
            PyTuple_SET_ITEM(new_refs, i, item);
        }
        Py_INCREF(new_ref);
        PyTuple_SET_ITEM(new_refs, ref_count, new_ref);
        return Py_BuildValue("(y#N)", (const char *)out, (Py_ssize_t)GROUP_BLOCKS, new_refs);
    }
    PyObject *result = NULL;
    int done = renumber(slots, refs, first, end, new_ref, &result);
    if (done == 0)
        return fallback(reference, args, nargs, NULL);
    return done < 0 ? NULL : result;
}

/* group_map.apply_write */
static PyObject *
fast_apply_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 4 || kwnames != NULL || py_apply_write == NULL)
        return fallback(py_apply_write, args, nargs, kwnames);
    PyObject *first = args[1], *count = args[2], *ref = args[3];
    /* first_block == 0 and block_count == GROUP_BLOCKS: the whole group is the new record */
    if (PyLong_CheckExact(first) && PyLong_CheckExact(count) && PyLong_AsSsize_t(first) == 0
        && PyLong_AsSsize_t(count) == GROUP_BLOCKS) {
        PyObject *refs = PyTuple_Pack(1, ref);
        return refs == NULL ? NULL : Py_BuildValue("(ON)", full_slots, refs);
    }
    PyErr_Clear(); /* PyLong_AsSsize_t of a huge int: not the whole group */
    return rebuild(py_apply_write, args, nargs, args[0], first, count, ref);
}

/* group_map.apply_hole */
static PyObject *
fast_apply_hole(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 3 || kwnames != NULL || py_apply_hole == NULL)
        return fallback(py_apply_hole, args, nargs, kwnames);
    PyObject *state = args[0], *first = args[1], *count = args[2];
    if (state == Py_None)
        return Py_NewRef(empty_state);
    if (PyLong_CheckExact(first) && PyLong_CheckExact(count) && PyLong_AsSsize_t(first) == 0
        && PyLong_AsSsize_t(count) == GROUP_BLOCKS)
        return Py_NewRef(empty_state);
    PyErr_Clear();
    return rebuild(py_apply_hole, args, nargs, state, first, count, Py_None);
}

/* group_map.py's FULL_SLOTS and EMPTY_STATE (returned as they are) and its reference
 * functions, at its import. */
static PyObject *
fast_setup_group_map(PyObject *module, PyObject *args)
{
    PyObject *full, *empty, *reference;
    if (!PyArg_ParseTuple(args, "SO!O!:setup_group_map", &full, &PyTuple_Type, &empty, &PyDict_Type, &reference))
        return NULL;
    unsigned char expected[GROUP_BLOCKS];
    for (int i = 0; i < GROUP_BLOCKS; i++)
        expected[i] = (unsigned char)i;
    PyObject *hole = PyTuple_GET_SIZE(empty) == 2 ? PyTuple_GET_ITEM(empty, 0) : NULL;
    if (PyBytes_GET_SIZE(full) != GROUP_BLOCKS || memcmp(PyBytes_AS_STRING(full), expected, GROUP_BLOCKS) != 0
        || hole == NULL || !PyBytes_CheckExact(hole) || PyBytes_GET_SIZE(hole) != GROUP_BLOCKS
        || !PyTuple_CheckExact(PyTuple_GET_ITEM(empty, 1)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(empty, 1)) != 0) {
        PyErr_SetString(PyExc_ImportError, "chunkvol.format.fast was built for another group map format: rebuild "
                                           "it (make install)");
        return NULL;
    }
    memset(expected, HOLE, GROUP_BLOCKS);
    if (memcmp(PyBytes_AS_STRING(hole), expected, GROUP_BLOCKS) != 0) {
        PyErr_SetString(PyExc_ImportError, "chunkvol.format.fast was built for another group map format: rebuild "
                                           "it (make install)");
        return NULL;
    }
    PyObject *write = PyDict_GetItemString(reference, "apply_write");
    PyObject *hole_function = PyDict_GetItemString(reference, "apply_hole");
    PyObject *encode = PyDict_GetItemString(reference, "encode_state");
    PyObject *decode = PyDict_GetItemString(reference, "decode_state");
    if (write == NULL || hole_function == NULL || encode == NULL || decode == NULL) {
        PyErr_SetString(PyExc_KeyError, "setup_group_map: no reference apply_write, apply_hole, encode_state or "
                                        "decode_state");
        return NULL;
    }
    Py_XSETREF(full_slots, Py_NewRef(full));
    Py_XSETREF(empty_state, Py_NewRef(empty));
    Py_XSETREF(py_apply_write, Py_NewRef(write));
    Py_XSETREF(py_apply_hole, Py_NewRef(hole_function));
    Py_XSETREF(py_encode_state, Py_NewRef(encode));
    Py_XSETREF(py_decode_state, Py_NewRef(decode));
    Py_RETURN_NONE;
}

/* ---- group_map.py: the LMDB values ------------------------------------------------------ */

#define VALUE_HEAD 22
#define REF_SIZE 22
#define MAX_KEY 64 /* group_map keys are 24 bytes; anything longer goes the Python way */


/* One ref (address u64, stored_length u32, hlc u64, flags u16) packed at p: 1 done, 0 not
 * a plain 4-tuple of ints in range (struct.pack decides: fall back). */
static int
pack_ref(PyObject *ref, unsigned char *p)
{
    if (!PyTuple_Check(ref) || Py_TYPE(ref)->tp_iter != PyTuple_Type.tp_iter || PyTuple_GET_SIZE(ref) != 4)
        return 0;
    uint64_t address, stored_length, hlc, flags;
    if (!uint_arg(PyTuple_GET_ITEM(ref, 0), UINT64_MAX, &address)
        || !uint_arg(PyTuple_GET_ITEM(ref, 1), UINT32_MAX, &stored_length)
        || !uint_arg(PyTuple_GET_ITEM(ref, 2), UINT64_MAX, &hlc) || !uint_arg(PyTuple_GET_ITEM(ref, 3), 0xFFFF, &flags))
        return 0;
    put64(p, address);
    put32(p + 8, stored_length);
    put64(p + 12, hlc);
    put16(p + 20, flags);
    return 1;
}

/* group_map.encode_state(state, raw_key) */
static PyObject *
fast_encode_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 2 || kwnames != NULL || py_encode_state == NULL)
        return fallback(py_encode_state, args, nargs, kwnames);
    PyObject *state = args[0], *raw_key = args[1];
    if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 2 || !PyBytes_CheckExact(raw_key)
        || PyBytes_GET_SIZE(raw_key) > MAX_KEY)
        return fallback(py_encode_state, args, nargs, kwnames);
    PyObject *slots = PyTuple_GET_ITEM(state, 0), *refs = PyTuple_GET_ITEM(state, 1);
    if (!PyBytes_CheckExact(slots) || PyBytes_GET_SIZE(slots) != GROUP_BLOCKS || !PyTuple_CheckExact(refs)
        || PyTuple_GET_SIZE(refs) > GROUP_BLOCKS)
        return fallback(py_encode_state, args, nargs, kwnames);
    /* key, then the value with its checksum field 0: what the checksum covers */
    unsigned char signed_bytes[MAX_KEY + VALUE_HEAD + REF_SIZE * GROUP_BLOCKS];
    Py_ssize_t key_size = PyBytes_GET_SIZE(raw_key), count = PyTuple_GET_SIZE(refs);
    Py_ssize_t size = VALUE_HEAD + REF_SIZE * count;
    unsigned char *value = signed_bytes + key_size;
    memcpy(signed_bytes, PyBytes_AS_STRING(raw_key), key_size);
    value[0] = (unsigned char)count;
    value[1] = 0;
    put32(value + 2, 0);
    memcpy(value + 6, PyBytes_AS_STRING(slots), GROUP_BLOCKS);
    for (Py_ssize_t i = 0; i < count; i++)
        if (!pack_ref(PyTuple_GET_ITEM(refs, i), value + VALUE_HEAD + REF_SIZE * i))
            return fallback(py_encode_state, args, nargs, kwnames);
    put32(value + 2, xxh3(signed_bytes, key_size + size) & 0xFFFFFFFF);
    return PyBytes_FromStringAndSize((const char *)value, size);
}

/* group_map.decode_state(raw, raw_key): a good value only; a bad one (short, bad length,
 * bad checksum) goes to the Python, which raises its CorruptionError. */
static PyObject *
fast_decode_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs != 2 || kwnames != NULL || py_decode_state == NULL)
        return fallback(py_decode_state, args, nargs, kwnames);
    PyObject *raw = args[0], *raw_key = args[1];
    if (!PyBytes_CheckExact(raw) || !PyBytes_CheckExact(raw_key) || PyBytes_GET_SIZE(raw_key) > MAX_KEY
        || PyBytes_GET_SIZE(raw) < VALUE_HEAD)
        return fallback(py_decode_state, args, nargs, kwnames);
    const unsigned char *value = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t count = value[0], key_size = PyBytes_GET_SIZE(raw_key);
    if (count > GROUP_BLOCKS || PyBytes_GET_SIZE(raw) != VALUE_HEAD + REF_SIZE * count)
        return fallback(py_decode_state, args, nargs, kwnames);
    unsigned char signed_bytes[MAX_KEY + VALUE_HEAD + REF_SIZE * GROUP_BLOCKS];
    memcpy(signed_bytes, PyBytes_AS_STRING(raw_key), key_size);
    memcpy(signed_bytes + key_size, value, PyBytes_GET_SIZE(raw));
    put32(signed_bytes + key_size + 2, 0);
    if ((xxh3(signed_bytes, key_size + PyBytes_GET_SIZE(raw)) & 0xFFFFFFFF) != get32(value + 2))
        return fallback(py_decode_state, args, nargs, kwnames);
    PyObject *refs = PyTuple_New(count);
    if (refs == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *p = value + VALUE_HEAD + REF_SIZE * i;
        PyObject *ref = Py_BuildValue("(KkKk)", (unsigned long long)get64(p), (unsigned long)get32(p + 8),
                                      (unsigned long long)get64(p + 12), (unsigned long)get16(p + 20));
        if (ref == NULL) {
            Py_DECREF(refs);
            return NULL;
        }
        PyTuple_SET_ITEM(refs, i, ref);
    }
    return Py_BuildValue("(y#N)", (const char *)value + 6, (Py_ssize_t)GROUP_BLOCKS, refs);
}

/* ---- module ---------------------------------------------------------------------------- */

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))fast_##name, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef methods[] = {
    FAST(encode_header_into, "record.encode_header_into, in C."),
    FAST(encode_record_into, "record.encode_record_into, in C."),
    FAST(block_table, "record.block_table, in C."),
    FAST(decode_header, "record.decode_header, in C."),
    FAST(verify_blocks, "record.verify_blocks, in C."),
    FAST(apply_write, "group_map.apply_write, in C."),
    FAST(apply_hole, "group_map.apply_hole, in C."),
    FAST(encode_state, "group_map.encode_state, in C."),
    FAST(decode_state, "group_map.decode_state, in C (a bad value goes to the Python, which raises)."),
    {"xxh3_variants", fast_xxh3_variants, METH_O,
     "xxh3_variants(data): ((variant, xxh3-64 of data), ...) for each long-input variant this CPU runs."},
    {"setup_record", fast_setup_record, METH_VARARGS,
     "setup_record(RecordHeader, CorruptionError, FormatError, known types, constants, reference functions)"},
    {"setup_group_map", fast_setup_group_map, METH_VARARGS,
     "setup_group_map(FULL_SLOTS, EMPTY_STATE, reference functions)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "chunkvol.format.fast",
    "C versions of the hot path's functions of format/record.py and format/group_map.py.", -1, methods,
};

PyMODINIT_FUNC
PyInit_fast(void)
{
    PyObject *mmap_module = PyImport_ImportModule("mmap");
    if (mmap_module == NULL)
        return NULL;
    mmap_type = (PyTypeObject *)PyObject_GetAttrString(mmap_module, "mmap");
    Py_DECREF(mmap_module);
    if (mmap_type == NULL)
        return NULL;
#ifdef HASH_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) { /* libgcc also checks the OS saves the registers */
        hash_long = hash_long_avx512;
        hash_variant = "avx512";
    } else if (__builtin_cpu_supports("avx2")) {
        hash_long = hash_long_avx2;
        hash_variant = "avx2";
    }
#endif
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && PyModule_AddStringConstant(module, "XXH3_VARIANT", hash_variant) < 0)
        Py_CLEAR(module);
    return module;
}
