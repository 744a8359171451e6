/* Error codes and the one-line messages every failing call leaves. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

const char *qcow2_status_name(int status)
{
    switch (status) {
    case QCOW2_OK:              return "ok";
    case QCOW2_E_IO:            return "io";
    case QCOW2_E_NOSPC:         return "nospace";
    case QCOW2_E_NOTFOUND:      return "notfound";
    case QCOW2_E_EXISTS:        return "exists";
    case QCOW2_E_INVALID:       return "invalid";
    case QCOW2_E_CORRUPT:       return "corrupt";
    case QCOW2_E_UNSUPPORTED:   return "unsupported";
    case QCOW2_E_READONLY:      return "readonly";
    case QCOW2_E_KEY:           return "key";
    case QCOW2_E_NOMEM:         return "nomem";
    case QCOW2_E_BUSY:          return "busy";
    default:                    return "io";
    }
}

/* Messages are one line: a newline from a hostile string (a backing name)
 * must not break the "msg" contract. */
static void flatten_line(char *msg)
{
    for (char *p = msg; *p; p++) {
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    }
}

/* Formatted into a local buffer first: the arguments may point into
 * err->msg itself (a caller wrapping the message a failed call left). */
static int error_vset(qcow2_error *err, int code, const char *prefix,
                      const char *fmt, va_list ap)
{
    char msg[sizeof err->msg];
    size_t used = 0;

    msg[0] = '\0';
    if (prefix) {
        int n = snprintf(msg, sizeof msg, "%s: ", prefix);
        used = n < 0 ? 0 : (size_t)n;
        if (used >= sizeof msg)
            used = sizeof msg - 1;
    }
    vsnprintf(msg + used, sizeof msg - used, fmt, ap);
    flatten_line(msg);
    memcpy(err->msg, msg, sizeof msg);
    err->code = code;
    return code;
}

int qcow2_error_set(qcow2_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(err, code, NULL, fmt, ap);
    va_end(ap);
    return code;
}

int qcow2_fail(qcow2_image *img, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_vset(&img->err, code, img->path ? img->path : "qcow2", fmt, ap);
    va_end(ap);
    return code;
}

/* strerror is not thread safe (its buffer is static for unknown values);
 * the GNU strerror_r returns the text (static or in buf), the XSI one
 * fills buf. errno 0 (a short read or write) reads as "I/O error". */
const char *qcow2_errno_text(int sys_errno, char *buf, size_t len)
{
    if (sys_errno == 0)
        return "I/O error";
#if defined(__GLIBC__) && defined(_GNU_SOURCE)
    return strerror_r(sys_errno, buf, len);
#else
    if (strerror_r(sys_errno, buf, len) != 0)
        snprintf(buf, len, "error %d", sys_errno);
    return buf;
#endif
}

const char *qcow2_errmsg(const qcow2_image *img)
{
    return img->err.msg;
}

int qcow2_errcode(const qcow2_image *img)
{
    return img->err.code;
}
