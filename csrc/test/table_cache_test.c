/*
 * Unit test of the generic metadata-table cache (csrc/engine/table_cache.c)
 * against a fake backend: an in-memory disk of 512-byte tables and a log of
 * every read, write-back and barrier. Prints one TAP line per case
 * ("ok N - name" / "not ok N - name: why"); spec/table_cache_spec.lua runs
 * it. Built by `make test-progs`, never part of the module or the rock.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../qcow2.h"
#include "../engine/table_cache.h"

#define BITS        9u
#define TBYTES      (1u << BITS)
#define N_TABLES    64u
#define LOG_MAX     4096

typedef struct event {
    char kind;                  /* 'R'ead, 'W'rite-back, 'B'arrier */
    char who;                   /* which backend ('l' L2, 'r' refcount) */
    uint64_t offset;
} event;

/* Shared by the backends of one case: the log gives the global order. */
typedef struct world {
    uint8_t disk[N_TABLES * TBYTES];
    event log[LOG_MAX];
    int n_log;
    char last_fail[200];
} world;

typedef struct backend {
    world *w;
    char who;
    /* Faults at one offset each (0: none; table 0 is never faulted). */
    uint64_t fail_write_at;     /* the write-back fails */
    uint64_t fail_read_at;      /* the read fails */
    uint64_t short_read_at;     /* the read answers QCOW2_TABLE_NOT_KEPT */
    uint64_t n_reads;           /* all of them (the log may fill up) */
} backend;

static void log_event(world *w, char kind, char who, uint64_t offset)
{
    if (w->n_log < LOG_MAX)
        w->log[w->n_log++] = (event){ kind, who, offset };
}

static int fake_read(void *ctx, uint64_t offset, void *table, size_t len)
{
    backend *b = ctx;

    log_event(b->w, 'R', b->who, offset);
    b->n_reads++;
    if (b->fail_read_at && offset == b->fail_read_at)
        return QCOW2_E_IO;
    if (b->short_read_at && offset == b->short_read_at)
        return QCOW2_TABLE_NOT_KEPT;
    if (offset + len > sizeof b->w->disk)
        return QCOW2_E_CORRUPT;
    memcpy(table, b->w->disk + offset, len);
    return 0;
}

static int fake_write(void *ctx, uint64_t offset, const void *table,
                      size_t len)
{
    backend *b = ctx;

    if (b->fail_write_at && offset == b->fail_write_at)
        return QCOW2_E_IO;
    log_event(b->w, 'W', b->who, offset);
    memcpy(b->w->disk + offset, table, len);
    return 0;
}

static int fake_barrier(void *ctx)
{
    backend *b = ctx;

    log_event(b->w, 'B', b->who, 0);
    return 0;
}

static int fake_fail(void *ctx, int code, const char *msg)
{
    backend *b = ctx;

    snprintf(b->w->last_fail, sizeof b->w->last_fail, "%s", msg);
    return code;
}

static world *new_world(void)
{
    world *w = calloc(1, sizeof *w);

    if (!w)
        abort();
    /* Each table's bytes say which table it is. */
    for (uint32_t t = 0; t < N_TABLES; t++)
        memset(w->disk + t * TBYTES, (int)(t + 1), TBYTES);
    return w;
}

static qcow2_table_cache *new_cache(backend *b, world *w, char who,
                                    uint32_t slots, int writer)
{
    qcow2_table_cache_ops ops = { .ctx = b, .read = fake_read,
                                  .write = writer ? fake_write : NULL,
                                  .barrier = fake_barrier,
                                  .fail = fake_fail };
    qcow2_table_cache *cache;

    memset(b, 0, sizeof *b);
    b->w = w;
    b->who = who;
    if (qcow2_table_cache_new(slots, BITS, who == 'l' ? "L2 table"
                              : "refcount block", &ops, &cache) != 0)
        abort();
    return cache;
}

static uint64_t T(uint32_t n) { return (uint64_t)n * TBYTES; }

/* ---- checks: the first failure of a case is kept as its reason ------- */
static char why[300];

#define CHECK(cond, ...) do { \
        if (!(cond) && !why[0]) { \
            snprintf(why, sizeof why, "line %d: ", __LINE__); \
            snprintf(why + strlen(why), sizeof why - strlen(why), \
                     __VA_ARGS__); \
        } \
    } while (0)

static qcow2_table_cache_stats stats(const qcow2_table_cache *cache)
{
    qcow2_table_cache_stats s;

    qcow2_table_cache_get_stats(cache, &s);
    return s;
}

static int count(const world *w, char kind, char who)
{
    int n = 0;

    for (int i = 0; i < w->n_log; i++)
        n += w->log[i].kind == kind && w->log[i].who == who;
    return n;
}

/* Get table n and check it holds table n's bytes. */
static void get_ok(qcow2_table_cache *cache, uint32_t n, uint8_t fill)
{
    uint8_t *table = NULL;
    int rc = qcow2_table_cache_get(cache, T(n), &table);

    CHECK(rc == 0 && table, "get table %u: rc %d", n, rc);
    if (table)
        CHECK(table[0] == fill && table[TBYTES - 1] == fill,
              "table %u holds 0x%02x, not 0x%02x", n, table[0], fill);
}

/* ---- cases ------------------------------------------------------------ */
static void hit_and_miss(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'l', 4, 1);
    qcow2_table_cache_stats s;

    get_ok(c, 3, 4);                /* miss */
    get_ok(c, 3, 4);                /* hit */
    get_ok(c, 5, 6);                /* miss */
    get_ok(c, 3, 4);                /* hit */
    get_ok(c, 5, 6);                /* hit */
    s = stats(c);
    CHECK(s.hits == 3 && s.misses == 2, "hits %llu misses %llu",
          (unsigned long long)s.hits, (unsigned long long)s.misses);
    CHECK(count(w, 'R', 'l') == 2, "%d reads, want 2", count(w, 'R', 'l'));
    CHECK(s.n_used == 2, "%u used", s.n_used);
    CHECK(qcow2_table_cache_lookup(c, T(4)) == NULL, "table 4 never read");
    qcow2_table_cache_free(c);
    free(w);
}

static void lru_eviction(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'l', 3, 1);

    get_ok(c, 1, 2);
    get_ok(c, 2, 3);
    get_ok(c, 3, 4);
    get_ok(c, 1, 2);                /* 2 is now the least recently used */
    get_ok(c, 4, 5);
    CHECK(!qcow2_table_cache_lookup(c, T(2)), "table 2 not evicted");
    CHECK(qcow2_table_cache_lookup(c, T(1)) &&
          qcow2_table_cache_lookup(c, T(3)) &&
          qcow2_table_cache_lookup(c, T(4)), "a recent table was evicted");
    get_ok(c, 2, 3);                /* evicts 3 */
    CHECK(!qcow2_table_cache_lookup(c, T(3)), "table 3 not evicted");
    CHECK(qcow2_table_cache_lookup(c, T(1)), "table 1 evicted");
    CHECK(count(w, 'W', 'l') == 0, "a clean table was written back");
    qcow2_table_cache_free(c);
    free(w);
}

static void dirty_eviction_writes_back_first(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'l', 2, 1);
    uint8_t *table;

    qcow2_table_cache_get(c, T(1), &table);
    memset(table, 0xAA, TBYTES);
    qcow2_table_cache_mark_dirty(c, T(1));
    get_ok(c, 2, 3);
    CHECK(stats(c).n_dirty == 1, "%u dirty", stats(c).n_dirty);
    w->n_log = 0;
    get_ok(c, 3, 4);                /* evicts table 1 */
    CHECK(w->n_log >= 2 && w->log[0].kind == 'W' &&
          w->log[0].offset == T(1) && w->log[1].kind == 'R' &&
          w->log[1].offset == T(3),
          "log starts %c%llu, want a write-back of table 1, then the read",
          w->n_log ? w->log[0].kind : '-',
          w->n_log ? (unsigned long long)w->log[0].offset : 0ull);
    CHECK(w->disk[T(1)] == 0xAA && w->disk[T(2) - 1] == 0xAA,
          "the dirty bytes did not reach the disk");
    CHECK(stats(c).writebacks == 1 && stats(c).n_dirty == 0,
          "writebacks %llu dirty %u",
          (unsigned long long)stats(c).writebacks, stats(c).n_dirty);
    qcow2_table_cache_free(c);
    free(w);
}

static void write_through_never_evicts_dirty(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'l', 2, 0);
    uint8_t *table = NULL;
    int rc;

    get_ok(c, 1, 2);
    qcow2_table_cache_mark_dirty(c, T(1));
    get_ok(c, 2, 3);
    get_ok(c, 3, 4);                /* passes over dirty 1, evicts 2 */
    CHECK(qcow2_table_cache_lookup(c, T(1)), "dirty table 1 was evicted");
    CHECK(!qcow2_table_cache_lookup(c, T(2)), "table 2 still cached");
    qcow2_table_cache_mark_dirty(c, T(3));
    rc = qcow2_table_cache_get(c, T(4), &table);
    CHECK(rc == QCOW2_E_BUSY && !table, "all dirty: rc %d", rc);
    CHECK(strstr(w->last_fail, "L2 table cache") != NULL,
          "message '%s'", w->last_fail);
    qcow2_table_cache_mark_clean(c, T(3));
    get_ok(c, 4, 5);
    CHECK(qcow2_table_cache_lookup(c, T(1)) && !qcow2_table_cache_lookup(c, T(3)),
          "after mark_clean, table 3 is the one evicted");
    qcow2_table_cache_free(c);
    free(w);
}

static void flush_respects_dependency(void)
{
    world *w = new_world();
    backend bl, br;
    qcow2_table_cache *l2 = new_cache(&bl, w, 'l', 4, 1);
    qcow2_table_cache *rc = new_cache(&br, w, 'r', 4, 1);
    int first_l2_write = -1, last_rc_write = -1, barrier_between = 0;

    get_ok(l2, 1, 2);
    get_ok(l2, 2, 3);
    get_ok(rc, 10, 11);
    get_ok(rc, 11, 12);
    get_ok(rc, 12, 13);
    qcow2_table_cache_mark_dirty(l2, T(1));
    qcow2_table_cache_mark_dirty(l2, T(2));
    qcow2_table_cache_mark_dirty(rc, T(10));
    qcow2_table_cache_mark_dirty(rc, T(12));
    CHECK(qcow2_table_cache_set_dependency(l2, rc) == 0, "set_dependency");
    w->n_log = 0;
    CHECK(qcow2_table_cache_flush(l2) == 0, "flush failed");
    for (int i = 0; i < w->n_log; i++) {
        if (w->log[i].kind == 'W' && w->log[i].who == 'r')
            last_rc_write = i;
        if (w->log[i].kind == 'W' && w->log[i].who == 'l' &&
            first_l2_write < 0)
            first_l2_write = i;
        if (w->log[i].kind == 'B' && last_rc_write >= 0 &&
            first_l2_write < 0)
            barrier_between = 1;
    }
    CHECK(count(w, 'W', 'r') == 2 && count(w, 'W', 'l') == 2,
          "%d refcount and %d L2 write-backs, want 2 and 2",
          count(w, 'W', 'r'), count(w, 'W', 'l'));
    CHECK(last_rc_write >= 0 && first_l2_write > last_rc_write,
          "an L2 table was written before a refcount block");
    CHECK(barrier_between, "no barrier between refcount blocks and L2");
    CHECK(w->n_log > 0 && w->log[w->n_log - 1].kind == 'B',
          "no barrier after the L2 write-backs");
    CHECK(stats(l2).n_dirty == 0 && stats(rc).n_dirty == 0, "still dirty");

    /* The dependency is one-shot (QEMU's): once met it no longer holds. */
    qcow2_table_cache_mark_dirty(rc, T(11));
    qcow2_table_cache_mark_dirty(l2, T(1));
    w->n_log = 0;
    CHECK(qcow2_table_cache_flush(l2) == 0, "second flush failed");
    CHECK(count(w, 'W', 'r') == 0 && count(w, 'W', 'l') == 1,
          "second flush wrote %d refcount, %d L2 tables",
          count(w, 'W', 'r'), count(w, 'W', 'l'));

    /* Evicting a dirty L2 table honours the dependency too. */
    CHECK(qcow2_table_cache_set_dependency(l2, rc) == 0, "set again");
    qcow2_table_cache_mark_dirty(l2, T(2));
    get_ok(l2, 3, 4);
    get_ok(l2, 4, 5);
    get_ok(l2, 1, 2);
    w->n_log = 0;
    get_ok(l2, 5, 6);               /* evicts table 2, dirty */
    CHECK(w->n_log >= 3 && w->log[0].kind == 'W' && w->log[0].who == 'r' &&
          w->log[0].offset == T(11) && w->log[1].kind == 'B' &&
          w->log[2].kind == 'W' && w->log[2].who == 'l' &&
          w->log[2].offset == T(2),
          "eviction log: %c%c then %c%c",
          w->n_log > 0 ? w->log[0].kind : '-',
          w->n_log > 0 ? w->log[0].who : '-',
          w->n_log > 1 ? w->log[1].kind : '-',
          w->n_log > 1 ? w->log[1].who : '-');
    CHECK(qcow2_table_cache_set_dependency(l2, l2) == QCOW2_E_INVALID,
          "a cache may not depend on itself");
    qcow2_table_cache_free(l2);
    qcow2_table_cache_free(rc);
    free(w);
}

static void failed_write_back_stays_dirty(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'l', 2, 1);
    uint8_t *table = NULL;
    int rc;

    qcow2_table_cache_get(c, T(1), &table);
    memset(table, 0x55, TBYTES);
    qcow2_table_cache_mark_dirty(c, T(1));
    get_ok(c, 2, 3);
    b.fail_write_at = T(1);
    rc = qcow2_table_cache_flush(c);
    CHECK(rc == QCOW2_E_IO, "flush rc %d, want QCOW2_E_IO", rc);
    CHECK(stats(c).n_dirty == 1, "%u dirty after a failed write-back",
          stats(c).n_dirty);
    rc = qcow2_table_cache_get(c, T(3), &table);     /* would evict 1 */
    CHECK(rc == QCOW2_E_IO, "eviction rc %d, want QCOW2_E_IO", rc);
    table = qcow2_table_cache_lookup(c, T(1));
    CHECK(table && table[7] == 0x55, "the dirty table was lost");
    CHECK(w->disk[T(1)] == 2, "the disk changed");
    /* A failed write of overlapping bytes forgets clean tables only. */
    qcow2_table_cache_mirror(c, T(1), 2 * TBYTES, NULL);
    CHECK(qcow2_table_cache_lookup(c, T(1)), "dirty table forgotten");
    CHECK(!qcow2_table_cache_lookup(c, T(2)), "clean table kept");
    b.fail_write_at = 0;
    CHECK(qcow2_table_cache_flush(c) == 0, "flush after the fault");
    CHECK(stats(c).n_dirty == 0 && w->disk[T(1) + 7] == 0x55,
          "the table did not reach the disk");
    qcow2_table_cache_free(c);
    free(w);
}

static void bounded_memory(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'r', 5, 1);
    uint8_t fresh[TBYTES];
    uint32_t x = 12345, worst = 0, lookups = 0;
    qcow2_table_cache_stats s;

    memset(fresh, 0x77, sizeof fresh);
    for (int i = 0; i < 5000; i++) {
        uint32_t n;
        x = x * 1103515245u + 12345u;
        n = (x >> 16) % N_TABLES;
        if (i % 7 == 0) {
            CHECK(qcow2_table_cache_install(c, T(n), fresh) == 0, "install");
        } else {
            uint8_t *table;
            lookups++;
            CHECK(qcow2_table_cache_get(c, T(n), &table) == 0, "get");
            if (i % 5 == 0)
                qcow2_table_cache_mark_dirty(c, T(n));
        }
        s = stats(c);
        if (s.n_buffers > worst)
            worst = s.n_buffers;
        CHECK(s.n_used <= 5 && s.n_buffers <= 5,
              "step %d: %u used, %u buffers for 5 slots", i, s.n_used,
              s.n_buffers);
    }
    s = stats(c);
    CHECK(worst == 5, "never filled: %u buffers", worst);
    CHECK(s.hits + s.misses == lookups, "hits + misses != lookups");
    CHECK(b.n_reads == s.misses, "reads %llu != misses %llu",
          (unsigned long long)b.n_reads, (unsigned long long)s.misses);
    qcow2_table_cache_free(c);
    free(w);
}

static void read_failures(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'r', 2, 1);
    uint8_t *table = (uint8_t *)1;
    int rc;

    b.fail_read_at = T(4);
    b.short_read_at = T(5);
    rc = qcow2_table_cache_get(c, T(4), &table);
    CHECK(rc == QCOW2_E_IO && !table, "failed read: rc %d", rc);
    rc = qcow2_table_cache_get(c, T(5), &table);
    CHECK(rc == QCOW2_TABLE_NOT_KEPT && !table, "not kept: rc %d", rc);
    CHECK(stats(c).n_used == 0, "%u used after two failed reads",
          stats(c).n_used);
    CHECK(!qcow2_table_cache_lookup(c, T(4)) &&
          !qcow2_table_cache_lookup(c, T(5)), "a failed read is cached");
    qcow2_table_cache_free(c);
    free(w);
}

static void mirror_write_through(void)
{
    world *w = new_world();
    backend b;
    qcow2_table_cache *c = new_cache(&b, w, 'r', 8, 1);
    uint8_t buf[TBYTES];
    uint8_t *t1, *t2;

    memset(buf, 0xEE, sizeof buf);
    get_ok(c, 1, 2);
    get_ok(c, 2, 3);
    /* The second half of table 1 and the first half of table 2. */
    qcow2_table_cache_mirror(c, T(1) + TBYTES / 2, TBYTES, buf);
    t1 = qcow2_table_cache_lookup(c, T(1));
    t2 = qcow2_table_cache_lookup(c, T(2));
    CHECK(t1 && t1[TBYTES / 2 - 1] == 2 && t1[TBYTES / 2] == 0xEE,
          "table 1 not mirrored at its second half");
    CHECK(t2 && t2[TBYTES / 2 - 1] == 0xEE && t2[TBYTES / 2] == 3,
          "table 2 not mirrored at its first half");
    /* A range longer than the cache: the scan path. */
    qcow2_table_cache_mirror(c, 0, 40 * TBYTES, NULL);
    CHECK(stats(c).n_used == 0, "%u left after dropping the range",
          stats(c).n_used);
    qcow2_table_cache_free(c);
    free(w);
}

int main(void)
{
    static const struct { const char *name; void (*fn)(void); } cases[] = {
        { "hit_and_miss", hit_and_miss },
        { "lru_eviction", lru_eviction },
        { "dirty_eviction_writes_back_first",
          dirty_eviction_writes_back_first },
        { "write_through_never_evicts_dirty",
          write_through_never_evicts_dirty },
        { "flush_respects_dependency", flush_respects_dependency },
        { "failed_write_back_stays_dirty", failed_write_back_stays_dirty },
        { "bounded_memory", bounded_memory },
        { "read_failures", read_failures },
        { "mirror_write_through", mirror_write_through },
    };
    size_t n = sizeof cases / sizeof cases[0];
    int failed = 0;

    printf("1..%zu\n", n);
    for (size_t i = 0; i < n; i++) {
        why[0] = '\0';
        cases[i].fn();
        if (why[0])
            failed++;
        printf("%sok %zu - %s%s%s\n", why[0] ? "not " : "", i + 1,
               cases[i].name, why[0] ? ": " : "", why);
    }
    return failed ? 1 : 0;
}
