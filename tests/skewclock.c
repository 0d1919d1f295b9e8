/* LD_PRELOAD shim: this process's wall clock (CLOCK_REALTIME) runs INFERQ_SKEW_S seconds off; nothing else.
 *
 * libfaketime would do, but it shifts the monotonic clock too, or (FAKETIME_DONT_FAKE_MONOTONIC=1)
 * breaks clock_nanosleep: Python's time.sleep then fails with EINVAL and its timed waits sleep 30 s
 * too long. A host whose wall clock is wrong still has a right monotonic clock and right kernel
 * timeouts; this is that host. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long skew_ns(void) {
    static long long skew = 0;
    static int read = 0;
    if (!read) {
        const char *raw = getenv("INFERQ_SKEW_S");
        skew = raw ? (long long)(atof(raw) * 1e9) : 0;
        read = 1;
    }
    return skew;
}

static void shift(struct timespec *ts) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + skew_ns();
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *) = 0;
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int result = real(clock, ts);
    if (result == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) shift(ts);
    return result;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    int result = clock_gettime(CLOCK_REALTIME, &ts);
    if (result == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    (void)tz;
    return result;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
