/*
 * hiredis (Debian libhiredis 0.14.1) as its users drive it: redisConnectWithTimeout + AUTH,
 * redisCommand with binary-safe %b, redisAppendCommand/redisGetReply pipelines, redisReconnect
 * after the server closed the connection. The contract (env, RESULT lines, features) is in
 * tests/clients/README.md; expected values are what redis-server 7.0 answers.
 *
 * Every feature runs in a child process of its own (its connections, an alarm of 10 s), which
 * hands its RESULT line to the parent through a pipe: a crash or hang in one feature is reported
 * as FAILED for that feature only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#define FEATURE_TIMEOUT_S 10
/* The whole program stays under the contract's 60 s even if every feature hangs. */
#define PROGRAM_BUDGET_S 55

static const char *host, *user, *password, *topology, *prefix;
static int port;

/* The running feature's outcome. */
static char status[16] = "works";
static char detail[1024];

static int set_outcome(const char *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int set_outcome(const char *st, const char *fmt, ...) {
    va_list ap;
    snprintf(status, sizeof status, "%s", st);
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return -1;
}
#define FAIL(...) set_outcome("FAILED", __VA_ARGS__)

static char keybuf[8][256];
static int keyslot;
/* A key of this run (hash-tagged in cluster topology so multi-key commands share a slot). */
static const char *key(const char *name) {
    char *k = keybuf[keyslot++ % 8];
    if (strcmp(topology, "cluster") == 0)
        snprintf(k, sizeof keybuf[0], "{%s}:%s", prefix, name);
    else
        snprintf(k, sizeof keybuf[0], "%s:%s", prefix, name);
    return k;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Connects and authenticates the way hiredis applications do. NULL (outcome set) on failure. */
static redisContext *connect_as(const char *u, const char *p) {
    struct timeval tv = {5, 0};
    redisContext *c = redisConnectWithTimeout(host, port, tv);
    if (c == NULL || c->err) {
        FAIL("connect to %s:%d: %s", host, port, c ? c->errstr : "out of memory");
        return NULL;
    }
    struct timeval rtv = {8, 0};
    redisSetTimeout(c, rtv);
    redisReply *r = redisCommand(c, "AUTH %s %s", u, p);
    if (r == NULL) {
        FAIL("AUTH: connection error: %s", c->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        set_outcome("refused", "%s", r->str);
        freeReplyObject(r);
        return NULL;
    }
    freeReplyObject(r);
    return c;
}
static redisContext *connect_app(void) { return connect_as(user, password); }

/* A reply that is not an error: NULL (outcome set: FAILED on a connection error, refused on an
 * error reply) otherwise. */
static redisReply *checked(redisContext *c, redisReply *r, const char *what) {
    if (r == NULL) {
        FAIL("%s: connection error: %s", what, c->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        set_outcome("refused", "%s", r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

static redisReply *cmd(redisContext *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    return checked(c, r, fmt);
}

static const char *type_name(int t) {
    switch (t) {
    case REDIS_REPLY_STRING: return "string";
    case REDIS_REPLY_ARRAY: return "array";
    case REDIS_REPLY_INTEGER: return "integer";
    case REDIS_REPLY_NIL: return "nil";
    case REDIS_REPLY_STATUS: return "status";
    case REDIS_REPLY_ERROR: return "error";
    }
    return "?";
}

/* Checks (and frees) a reply. */
static int want_str_type(redisReply *r, int type, const char *want, const char *what) {
    int ok = r->type == type && r->len == strlen(want) && memcmp(r->str, want, r->len) == 0;
    if (!ok) {
        if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS || r->type == REDIS_REPLY_ERROR)
            FAIL("%s: got %s \"%.100s\", expected %s \"%s\"", what, type_name(r->type), r->str,
                 type_name(type), want);
        else
            FAIL("%s: got a %s reply, expected %s \"%s\"", what, type_name(r->type), type_name(type), want);
    }
    freeReplyObject(r);
    return ok ? 0 : -1;
}
static int want_status(redisReply *r, const char *want, const char *what) {
    return want_str_type(r, REDIS_REPLY_STATUS, want, what);
}
static int want_bulk(redisReply *r, const char *want, const char *what) {
    return want_str_type(r, REDIS_REPLY_STRING, want, what);
}
static int want_int(redisReply *r, long long want, const char *what) {
    int ok = r->type == REDIS_REPLY_INTEGER && r->integer == want;
    if (!ok) {
        if (r->type == REDIS_REPLY_INTEGER)
            FAIL("%s: got %lld, expected %lld", what, r->integer, want);
        else
            FAIL("%s: got a %s reply, expected %lld", what, type_name(r->type), want);
    }
    freeReplyObject(r);
    return ok ? 0 : -1;
}
static int want_nil(redisReply *r, const char *what) {
    int ok = r->type == REDIS_REPLY_NIL;
    if (!ok)
        FAIL("%s: got a %s reply, expected nil", what, type_name(r->type));
    freeReplyObject(r);
    return ok ? 0 : -1;
}
/* An array of bulk strings equal to want[0..n). Frees r. */
static int want_bulks(redisReply *r, const char **want, size_t n, const char *what) {
    if (r->type != REDIS_REPLY_ARRAY || r->elements != n) {
        FAIL("%s: got a %s reply of %zu elements, expected %zu strings", what, type_name(r->type),
             r->type == REDIS_REPLY_ARRAY ? r->elements : 0, n);
        freeReplyObject(r);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_STRING || strcmp(e->str, want[i]) != 0) {
            FAIL("%s: element %zu is %s \"%.100s\", expected \"%s\"", what, i, type_name(e->type),
                 e->str ? e->str : "", want[i]);
            freeReplyObject(r);
            return -1;
        }
    }
    freeReplyObject(r);
    return 0;
}
/* An expected error reply containing needle. Frees r. */
static int want_error(redisContext *c, redisReply *r, const char *needle, const char *what) {
    if (r == NULL)
        return FAIL("%s: connection error: %s", what, c->errstr);
    int ok = r->type == REDIS_REPLY_ERROR && strstr(r->str, needle) != NULL;
    if (!ok)
        FAIL("%s: got a %s reply, expected a %s error", what, type_name(r->type), needle);
    freeReplyObject(r);
    return ok ? 0 : -1;
}

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        if ((expr) < 0)                                                                            \
            return -1;                                                                             \
    } while (0)
/* Runs a command; returns -1 from the feature when it fails or is refused. */
#define CMD(var, c, ...)                                                                           \
    redisReply *var = cmd(c, __VA_ARGS__);                                                         \
    if (var == NULL)                                                                               \
    return -1
#define CONNECT(var)                                                                               \
    redisContext *var = connect_app();                                                             \
    if (var == NULL)                                                                               \
    return -1

/* name=value field of a CLIENT LIST/INFO line (up to its newline) into out. */
static int field(const char *line, const char *name, char *out, size_t outlen) {
    size_t nl = strlen(name);
    const char *p = line;
    const char *end = line + strcspn(line, "\n");
    while (p && p < end) {
        if (strncmp(p, name, nl) == 0 && p[nl] == '=') {
            const char *v = p + nl + 1;
            size_t n = strcspn(v, " \r\n");
            if (n >= outlen)
                n = outlen - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return 0;
        }
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return -1;
}

/* ---- features ---- */

static int feat_auth(void) {
    CONNECT(c);
    CMD(r, c, "PING");
    TRY(want_status(r, "PONG", "PING"));
    struct timeval tv = {5, 0};
    redisContext *bad = redisConnectWithTimeout(host, port, tv);
    if (bad == NULL || bad->err)
        return FAIL("connect: %s", bad ? bad->errstr : "out of memory");
    TRY(want_error(bad, redisCommand(bad, "AUTH %s %s-wrong", user, password), "WRONGPASS",
                   "AUTH with a wrong password"));
    snprintf(detail, sizeof detail, "AUTH user pass; wrong password: WRONGPASS");
    return 0;
}

static int feat_select(void) {
    CONNECT(c);
    CMD(s, c, "SELECT 2");
    TRY(want_status(s, "OK", "SELECT 2"));
    const char *k = key("select");
    CMD(r, c, "SET %s %s", k, "in-db-2");
    TRY(want_status(r, "OK", "SET in db 2"));
    CMD(g, c, "GET %s", k);
    TRY(want_bulk(g, "in-db-2", "GET in db 2"));
    CONNECT(c0);
    CMD(g0, c0, "GET %s", k);
    TRY(want_nil(g0, "GET in db 0"));
    freeReplyObject(redisCommand(c, "DEL %s", k));
    snprintf(detail, sizeof detail, "SELECT 2");
    return 0;
}

static int feat_pipeline(void) {
    CONNECT(c);
    char k[256], v[32];
    for (int i = 0; i < 100; i++) {
        snprintf(k, sizeof k, "%s", key("pipe"));
        snprintf(v, sizeof v, "v%d", i);
        redisAppendCommand(c, "SET %s:%d %s", k, i, v);
    }
    for (int i = 0; i < 100; i++)
        redisAppendCommand(c, "GET %s:%d", key("pipe"), i);
    for (int i = 0; i < 200; i++) {
        redisReply *r = NULL;
        char what[64];
        snprintf(what, sizeof what, "pipelined reply %d", i);
        if (redisGetReply(c, (void **)&r) != REDIS_OK)
            return FAIL("%s: connection error: %s", what, c->errstr);
        if (checked(c, r, what) == NULL)
            return -1;
        if (i < 100) {
            TRY(want_status(r, "OK", what));
        } else {
            snprintf(v, sizeof v, "v%d", i - 100);
            TRY(want_bulk(r, v, what));
        }
    }
    for (int i = 0; i < 100; i++)
        redisAppendCommand(c, "DEL %s:%d", key("pipe"), i);
    for (int i = 0; i < 100; i++) {
        redisReply *r = NULL;
        if (redisGetReply(c, (void **)&r) != REDIS_OK)
            return FAIL("DEL: connection error: %s", c->errstr);
        freeReplyObject(r);
    }
    snprintf(detail, sizeof detail, "200 commands with redisAppendCommand/redisGetReply");
    return 0;
}

static redisReply *next_reply(redisContext *c, const char *what) {
    redisReply *r = NULL;
    if (redisGetReply(c, (void **)&r) != REDIS_OK) {
        FAIL("%s: connection error: %s", what, c->errstr);
        return NULL;
    }
    return checked(c, r, what);
}

static int feat_transaction(void) {
    CONNECT(c);
    const char *k = key("tx");
    redisAppendCommand(c, "MULTI");
    redisAppendCommand(c, "SET %s 10", k);
    redisAppendCommand(c, "INCR %s", k);
    redisAppendCommand(c, "EXEC");
    const char *want[] = {"OK", "QUEUED", "QUEUED"};
    for (int i = 0; i < 3; i++) {
        redisReply *r = next_reply(c, "MULTI/SET/INCR");
        if (r == NULL)
            return -1;
        TRY(want_status(r, want[i], "MULTI/SET/INCR"));
    }
    redisReply *e = next_reply(c, "EXEC");
    if (e == NULL)
        return -1;
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STATUS ||
        strcmp(e->element[0]->str, "OK") != 0 || e->element[1]->type != REDIS_REPLY_INTEGER ||
        e->element[1]->integer != 11) {
        freeReplyObject(e);
        return FAIL("EXEC: expected [OK, 11]");
    }
    freeReplyObject(e);
    CONNECT(other);
    CMD(w, c, "WATCH %s", k);
    TRY(want_status(w, "OK", "WATCH"));
    CMD(s, other, "SET %s changed", k);
    TRY(want_status(s, "OK", "SET from another connection"));
    CMD(m, c, "MULTI");
    TRY(want_status(m, "OK", "MULTI"));
    CMD(q, c, "SET %s mine", k);
    TRY(want_status(q, "QUEUED", "SET in MULTI"));
    CMD(x, c, "EXEC");
    TRY(want_nil(x, "EXEC after a watched key changed"));
    CMD(g, c, "GET %s", k);
    TRY(want_bulk(g, "changed", "value after the aborted EXEC"));
    freeReplyObject(redisCommand(c, "DEL %s", k));
    snprintf(detail, sizeof detail, "MULTI/EXEC -> [OK, 11]; WATCH conflict -> nil");
    return 0;
}

/* [kind, name, count] of a (un)subscribe confirmation. Frees r. */
static int want_sub(redisReply *r, const char *kind, const char *name, long long count) {
    int ok = r->type == REDIS_REPLY_ARRAY && r->elements == 3 && r->element[0]->type == REDIS_REPLY_STRING &&
             strcmp(r->element[0]->str, kind) == 0 && r->element[1]->type == REDIS_REPLY_STRING &&
             strcmp(r->element[1]->str, name) == 0 && r->element[2]->type == REDIS_REPLY_INTEGER &&
             r->element[2]->integer == count;
    freeReplyObject(r);
    if (!ok)
        return FAIL("expected [%s, %s, %lld]", kind, name, count);
    return 0;
}

static int feat_pubsub(void) {
    CONNECT(sub);
    CONNECT(pub);
    char ch[300], pat[300];
    snprintf(ch, sizeof ch, "%s:chan", prefix);
    snprintf(pat, sizeof pat, "%s:ch*", prefix);
    CMD(s1, sub, "SUBSCRIBE %s", ch);
    TRY(want_sub(s1, "subscribe", ch, 1));
    CMD(s2, sub, "PSUBSCRIBE %s", pat);
    TRY(want_sub(s2, "psubscribe", pat, 2));
    CMD(p, pub, "PUBLISH %s hello", ch);
    long long receivers = p->type == REDIS_REPLY_INTEGER ? p->integer : -1;
    /* Redis Cluster counts only the receivers on the node that took the PUBLISH. */
    if (strcmp(topology, "cluster") == 0 && p->type == REDIS_REPLY_INTEGER)
        freeReplyObject(p);
    else
        TRY(want_int(p, 2, "PUBLISH receivers"));
    int got_msg = 0, got_pmsg = 0;
    for (int i = 0; i < 2; i++) {
        redisReply *m = next_reply(sub, "pub/sub message");
        if (m == NULL)
            return -1;
        if (m->type == REDIS_REPLY_ARRAY && m->elements == 3 && strcmp(m->element[0]->str, "message") == 0) {
            const char *w[] = {"message", ch, "hello"};
            TRY(want_bulks(m, w, 3, "message"));
            got_msg = 1;
        } else {
            const char *w[] = {"pmessage", pat, ch, "hello"};
            TRY(want_bulks(m, w, 4, "pmessage"));
            got_pmsg = 1;
        }
    }
    if (!got_msg || !got_pmsg)
        return FAIL("got message %d, pmessage %d", got_msg, got_pmsg);
    CMD(u1, sub, "UNSUBSCRIBE %s", ch);
    TRY(want_sub(u1, "unsubscribe", ch, 1));
    CMD(u2, sub, "PUNSUBSCRIBE %s", pat);
    TRY(want_sub(u2, "punsubscribe", pat, 0));
    CMD(ping, sub, "PING");
    TRY(want_status(ping, "PONG", "PING after unsubscribing"));
    /* Keys on many slots (every node of a cluster) on the connection that left subscriber mode. */
    for (int i = 0; i < 10; i++) {
        char v[16];
        snprintf(v, sizeof v, "x%d", i);
        CMD(set, sub, "SET %s:after-sub:%d %s", prefix, i, v);
        TRY(want_status(set, "OK", "SET after unsubscribing"));
        CMD(get, sub, "GET %s:after-sub:%d", prefix, i);
        TRY(want_bulk(get, v, "GET after unsubscribing"));
        freeReplyObject(redisCommand(sub, "DEL %s:after-sub:%d", prefix, i));
    }
    snprintf(detail, sizeof detail, "message + pmessage, back to commands; PUBLISH counted %lld", receivers);
    return 0;
}

static int feat_blocking(void) {
    CONNECT(a);
    CONNECT(b);
    const char *k = key("blist");
    freeReplyObject(redisCommand(a, "DEL %s", k));
    double t0 = now_ms();
    redisAppendCommand(a, "BLPOP %s 5", k);
    int done = 0;
    while (!done)
        if (redisBufferWrite(a, &done) != REDIS_OK)
            return FAIL("BLPOP: write: %s", a->errstr);
    sleep_ms(200);
    CMD(p, b, "RPUSH %s v", k);
    TRY(want_int(p, 1, "RPUSH"));
    redisReply *r = next_reply(a, "BLPOP");
    if (r == NULL)
        return -1;
    const char *w[] = {k, "v"};
    TRY(want_bulks(r, w, 2, "BLPOP"));
    double waited = now_ms() - t0;
    if (waited < 150 || waited > 4000)
        return FAIL("BLPOP returned after %.0f ms", waited);
    double t1 = now_ms();
    CMD(e, a, "BLPOP %s 0.5", key("empty"));
    TRY(want_nil(e, "BLPOP of an empty list, timeout 0.5"));
    double t = now_ms() - t1;
    if (t < 400 || t > 3000)
        return FAIL("BLPOP 0.5 returned after %.0f ms", t);
    snprintf(detail, sizeof detail, "BLPOP woke after %.0f ms; empty -> nil after %.0f ms", waited, t);
    return 0;
}

static int feat_scripts(void) {
    CONNECT(c);
    const char *k = key("script");
    const char *body = "return {KEYS[1], ARGV[1]}";
    CMD(e, c, "EVAL %s 1 %s arg", body, k);
    const char *w1[] = {k, "arg"};
    TRY(want_bulks(e, w1, 2, "EVAL"));
    CMD(l, c, "SCRIPT LOAD %s", body);
    TRY(want_bulk(l, "d006f1a90249474274c76f5be725b8f5804a346b", "SCRIPT LOAD"));
    CMD(s, c, "EVALSHA d006f1a90249474274c76f5be725b8f5804a346b 1 %s x", k);
    const char *w2[] = {k, "x"};
    TRY(want_bulks(s, w2, 2, "EVALSHA"));
    TRY(want_error(c, redisCommand(c, "EVALSHA ffffffffffffffffffffffffffffffffffffffff 1 %s x", k),
                   "NOSCRIPT", "EVALSHA of an unknown sha"));
    snprintf(detail, sizeof detail, "EVAL, SCRIPT LOAD + EVALSHA, NOSCRIPT");
    return 0;
}

static int feat_large_value(void) {
    CONNECT(c);
    const char *k = key("big");
    size_t n = 8u << 20;
    char *v = malloc(n);
    if (v == NULL)
        return FAIL("out of memory");
    for (size_t i = 0; i < n; i++)
        v[i] = (char)(i * 7 + (i >> 16));
    CMD(s, c, "SET %s %b", k, v, n);
    TRY(want_status(s, "OK", "SET 8 MiB"));
    CMD(g, c, "GET %s", k);
    int same = g->type == REDIS_REPLY_STRING && (size_t)g->len == n && memcmp(g->str, v, n) == 0;
    size_t glen = g->type == REDIS_REPLY_STRING ? (size_t)g->len : 0;
    freeReplyObject(g);
    free(v);
    if (!same)
        return FAIL("GET 8 MiB: %zu bytes, not byte-exact", glen);
    freeReplyObject(redisCommand(c, "DEL %s", k));

    const char *l = key("biglist");
    int count = 100000;
    const char **argv = calloc(count + 2, sizeof *argv);
    size_t *lens = calloc(count + 2, sizeof *lens);
    char *items = malloc((size_t)count * 16);
    if (!argv || !lens || !items)
        return FAIL("out of memory");
    argv[0] = "RPUSH";
    argv[1] = l;
    for (int i = 0; i < count; i++) {
        char *it = items + (size_t)i * 16;
        snprintf(it, 16, "item-%d", i);
        argv[i + 2] = it;
    }
    for (int i = 0; i < count + 2; i++)
        lens[i] = strlen(argv[i]);
    redisReply *p = checked(c, redisCommandArgv(c, count + 2, argv, lens), "RPUSH 100000");
    if (p == NULL)
        return -1;
    TRY(want_int(p, count, "RPUSH 100000"));
    CMD(r, c, "LRANGE %s 0 -1", l);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != (size_t)count) {
        freeReplyObject(r);
        return FAIL("LRANGE: expected %d elements", count);
    }
    for (int i = 0; i < count; i++) {
        if (r->element[i]->type != REDIS_REPLY_STRING || strcmp(r->element[i]->str, argv[i + 2]) != 0) {
            freeReplyObject(r);
            return FAIL("LRANGE[%d] differs", i);
        }
    }
    freeReplyObject(r);
    freeReplyObject(redisCommand(c, "DEL %s", l));
    free(argv);
    free(lens);
    free(items);
    snprintf(detail, sizeof detail, "8 MiB binary value (%%b), 100000-element list (redisCommandArgv)");
    return 0;
}

static int feat_resp3(void) {
    return set_outcome("na", "hiredis %d.%d.%d speaks RESP2 only (RESP3 came with hiredis 1.0)",
                       HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
}

static int feat_reconnect(void) {
    CONNECT(a);
    CONNECT(b);
    const char *k = key("reconnect");
    CMD(s, a, "SET %s still-here", k);
    TRY(want_status(s, "OK", "SET"));
    CMD(id, a, "CLIENT ID");
    long long aid = id->integer;
    freeReplyObject(id);
    CMD(kill, b, "CLIENT KILL ID %lld", aid);
    TRY(want_int(kill, 1, "CLIENT KILL ID"));
    sleep_ms(100);
    /* hiredis surfaces the closed connection; its users reconnect, re-AUTH and retry once. */
    redisReply *g = redisCommand(a, "GET %s", k);
    if (g != NULL) {
        freeReplyObject(g);
        return FAIL("GET on the killed connection got a reply");
    }
    char first_err[128];
    snprintf(first_err, sizeof first_err, "%s", a->errstr);
    if (redisReconnect(a) != REDIS_OK)
        return FAIL("redisReconnect: %s", a->errstr);
    CMD(auth, a, "AUTH %s %s", user, password);
    TRY(want_status(auth, "OK", "AUTH after redisReconnect"));
    CMD(g2, a, "GET %s", k);
    TRY(want_bulk(g2, "still-here", "GET after redisReconnect"));
    CMD(id2, a, "CLIENT ID");
    long long aid2 = id2->integer;
    freeReplyObject(id2);
    if (aid2 == aid)
        return FAIL("same client id %lld after redisReconnect", aid);
    freeReplyObject(redisCommand(a, "DEL %s", k));
    snprintf(detail, sizeof detail,
             "after the documented single retry: the command fails (%s), redisReconnect + AUTH, retry "
             "works (id %lld -> %lld)",
             first_err, aid, aid2);
    return 0;
}

static int feat_client_list(void) {
    CONNECT(c);
    CMD(idr, c, "CLIENT ID");
    if (idr->type != REDIS_REPLY_INTEGER) {
        freeReplyObject(idr);
        return FAIL("CLIENT ID: not an integer");
    }
    long long id = idr->integer;
    freeReplyObject(idr);
    CMD(list, c, "CLIENT LIST");
    if (list->type != REDIS_REPLY_STRING) {
        freeReplyObject(list);
        return FAIL("CLIENT LIST: not a string");
    }
    char needle[64];
    snprintf(needle, sizeof needle, "id=%lld ", id);
    int found = strncmp(list->str, needle, strlen(needle)) == 0;
    for (char *p = strchr(list->str, '\n'); p && !found; p = strchr(p + 1, '\n'))
        found = strncmp(p + 1, needle, strlen(needle)) == 0;
    freeReplyObject(list);
    if (!found)
        return FAIL("CLIENT LIST has no line id=%lld", id);
    CMD(info, c, "CLIENT INFO");
    if (info->type != REDIS_REPLY_STRING) {
        freeReplyObject(info);
        return FAIL("CLIENT INFO: not a string");
    }
    char f_id[32] = "", addr[80] = "", f_user[128] = "", db[8] = "", resp[8] = "";
    field(info->str, "id", f_id, sizeof f_id);
    field(info->str, "addr", addr, sizeof addr);
    field(info->str, "user", f_user, sizeof f_user);
    field(info->str, "db", db, sizeof db);
    field(info->str, "resp", resp, sizeof resp);
    freeReplyObject(info);
    if (atoll(f_id) != id || strchr(addr, ':') == NULL || strcmp(f_user, user) != 0 || strcmp(db, "0") != 0 ||
        strcmp(resp, "2") != 0)
        return FAIL("CLIENT INFO: id=%s addr=%s user=%s db=%s resp=%s, expected id=%lld user=%s db=0 resp=2",
                    f_id, addr, f_user, db, resp, id, user);
    char name[300];
    snprintf(name, sizeof name, "%s-list", prefix);
    for (char *p = name; *p; p++)
        if (*p == ' ')
            *p = '_';
    CMD(sn, c, "CLIENT SETNAME %s", name);
    TRY(want_status(sn, "OK", "CLIENT SETNAME"));
    CMD(gn, c, "CLIENT GETNAME");
    TRY(want_bulk(gn, name, "CLIENT GETNAME"));
    snprintf(detail, sizeof detail, "id %lld, addr %s", id, addr);
    return 0;
}

/* The server closed c: its next command fails with a connection error. */
static int closed(redisContext *c, const char *what) {
    redisReply *r = redisCommand(c, "PING");
    if (r != NULL) {
        freeReplyObject(r);
        return FAIL("%s still answers", what);
    }
    return 0;
}

static int feat_client_kill(void) {
    char name[300];
    snprintf(name, sizeof name, "%s-victim", prefix);
    for (char *p = name; *p; p++)
        if (*p == ' ')
            *p = '_';
    CONNECT(a);
    CMD(sn, a, "CLIENT SETNAME %s", name);
    TRY(want_status(sn, "OK", "CLIENT SETNAME"));
    CONNECT(b);
    CMD(list, b, "CLIENT LIST");
    char addr[80] = "";
    char want_name[320];
    snprintf(want_name, sizeof want_name, " name=%s ", name);
    if (list->type == REDIS_REPLY_STRING) {
        char *hit = strstr(list->str, want_name);
        if (hit) {
            char *line = hit;
            while (line > list->str && line[-1] != '\n')
                line--;
            field(line, "addr", addr, sizeof addr);
        }
    }
    freeReplyObject(list);
    if (!addr[0])
        return FAIL("CLIENT LIST has no name=%s", name);
    CMD(k1, b, "CLIENT KILL %s", addr);
    TRY(want_status(k1, "OK", "CLIENT KILL addr"));
    TRY(closed(a, "the connection killed by address"));
    CONNECT(c);
    CMD(idr, c, "CLIENT ID");
    long long id = idr->integer;
    freeReplyObject(idr);
    CMD(k2, b, "CLIENT KILL ID %lld", id);
    TRY(want_int(k2, 1, "CLIENT KILL ID"));
    TRY(closed(c, "the connection killed by id"));
    snprintf(detail, sizeof detail, "killed %s (old form) and id %lld", addr, id);
    return 0;
}

static int array_has(redisReply *r, const char *want) {
    if (r->type != REDIS_REPLY_ARRAY)
        return 0;
    for (size_t i = 0; i < r->elements; i++)
        if (r->element[i]->type == REDIS_REPLY_STRING && strcmp(r->element[i]->str, want) == 0)
            return 1;
    return 0;
}

static int feat_acl(void) {
    CONNECT(c);
    CMD(who, c, "ACL WHOAMI");
    TRY(want_bulk(who, user, "ACL WHOAMI"));
    CMD(users, c, "ACL USERS");
    int has = array_has(users, user);
    size_t nusers = users->elements;
    freeReplyObject(users);
    if (!has)
        return FAIL("ACL USERS has no %s", user);
    CMD(cat, c, "ACL CAT");
    has = array_has(cat, "read");
    freeReplyObject(cat);
    if (!has)
        return FAIL("ACL CAT has no read");
    char wrong[300];
    snprintf(wrong, sizeof wrong, "%s-nosuchuser", prefix);
    TRY(want_error(c, redisCommand(c, "AUTH %s nopass", wrong), "WRONGPASS", "AUTH as an unknown user"));
    CMD(log, c, "ACL LOG 50");
    if (log->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(log);
        return FAIL("ACL LOG: not an array");
    }
    int found = 0;
    for (size_t i = 0; i < log->elements && !found; i++) {
        redisReply *e = log->element[i];
        const char *uname = NULL, *reason = NULL, *context = NULL;
        for (size_t j = 0; e->type == REDIS_REPLY_ARRAY && j + 1 < e->elements; j += 2) {
            const char *f = e->element[j]->str;
            redisReply *v = e->element[j + 1];
            if (f == NULL || v->type != REDIS_REPLY_STRING)
                continue;
            if (strcmp(f, "username") == 0)
                uname = v->str;
            else if (strcmp(f, "reason") == 0)
                reason = v->str;
            else if (strcmp(f, "context") == 0)
                context = v->str;
        }
        if (uname && strcmp(uname, wrong) == 0) {
            found = 1;
            if (!reason || strcmp(reason, "auth") != 0 || !context || strcmp(context, "toplevel") != 0) {
                FAIL("ACL LOG entry: reason %s, context %s, expected auth, toplevel", reason ? reason : "-",
                     context ? context : "-");
                freeReplyObject(log);
                return -1;
            }
        }
    }
    size_t nlog = log->elements;
    freeReplyObject(log);
    if (!found)
        return FAIL("ACL LOG has no entry for %s (%zu entries)", wrong, nlog);
    snprintf(detail, sizeof detail, "whoami %s; %zu users; ACL LOG reason auth", user, nusers);
    return 0;
}

static int feat_cluster_client(void) {
    return set_outcome("na", "hiredis has no cluster mode (that is the separate hiredis-cluster library)");
}

static const struct {
    const char *name;
    int (*run)(void);
} features[] = {
    {"auth", feat_auth},
    {"select", feat_select},
    {"pipeline", feat_pipeline},
    {"transaction", feat_transaction},
    {"pubsub", feat_pubsub},
    {"blocking", feat_blocking},
    {"scripts", feat_scripts},
    {"large_value", feat_large_value},
    {"resp3", feat_resp3},
    {"reconnect", feat_reconnect},
    {"client_list", feat_client_list},
    {"client_kill", feat_client_kill},
    {"acl", feat_acl},
    {"cluster_client", feat_cluster_client},
};
#define NFEATURES (sizeof features / sizeof features[0])

static const char *env(const char *name, const char *fallback) {
    const char *v = getenv(name);
    if (v && *v)
        return v;
    if (!fallback) {
        fprintf(stderr, "environment variable %s is not set (see tests/clients/README.md)\n", name);
        exit(2);
    }
    return fallback;
}

static int selected(const char *only, const char *name) {
    if (only == NULL || *only == 0)
        return 1;
    size_t n = strlen(name);
    for (const char *p = only; (p = strstr(p, name)) != NULL; p += n) {
        int start = p == only || p[-1] == ' ';
        int end = p[n] == 0 || p[n] == ' ';
        if (start && end)
            return 1;
    }
    return 0;
}

/* Runs one feature in a child; prints its RESULT line (FAILED if it crashed or hung). */
static void run_feature(size_t i, int timeout_s) {
    int fds[2];
    if (pipe(fds) < 0) {
        printf("RESULT %s FAILED pipe: %s\n", features[i].name, strerror(errno));
        return;
    }
    fflush(stdout);
    fflush(stderr);
    double t0 = now_ms();
    pid_t pid = fork();
    if (pid < 0) {
        printf("RESULT %s FAILED fork: %s\n", features[i].name, strerror(errno));
        return;
    }
    if (pid == 0) {
        close(fds[0]);
        alarm(timeout_s);
        features[i].run();
        for (char *p = detail; *p; p++)
            if (*p == '\n' || *p == '\r' || *p == '\t')
                *p = ' ';
        char line[1200];
        int n = snprintf(line, sizeof line, "RESULT %s %s %s\n", features[i].name, status, detail);
        if (n > (int)sizeof line - 1)
            n = sizeof line - 1;
        if (write(fds[1], line, n) != n)
            _exit(1);
        _exit(0);
    }
    close(fds[1]);
    char buf[1200];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof buf - 1 && (n = read(fds[0], buf + got, sizeof buf - 1 - got)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        got += n;
    }
    buf[got] = 0;
    close(fds[0]);
    int wst = 0;
    waitpid(pid, &wst, 0);
    if (got > 0 && buf[got - 1] == '\n') {
        fputs(buf, stdout);
    } else if (WIFSIGNALED(wst) && WTERMSIG(wst) == SIGALRM) {
        printf("RESULT %s FAILED timeout after %d s\n", features[i].name, timeout_s);
    } else if (WIFSIGNALED(wst)) {
        printf("RESULT %s FAILED killed by signal %d (%s)\n", features[i].name, WTERMSIG(wst),
               strsignal(WTERMSIG(wst)));
    } else {
        printf("RESULT %s FAILED exited with status %d without a result\n", features[i].name,
               WEXITSTATUS(wst));
    }
    fflush(stdout);
    fprintf(stderr, "[%s] done in %.0f ms\n", features[i].name, now_ms() - t0);
}

int main(void) {
    host = env("DM_HOST", NULL);
    port = atoi(env("DM_PORT", NULL));
    user = env("DM_USER", NULL);
    password = env("DM_PASSWORD", NULL);
    topology = env("DM_TOPOLOGY", "standalone");
    env("DM_MODE", "direct");
    static char default_prefix[64];
    snprintf(default_prefix, sizeof default_prefix, "compat:%d", (int)getpid());
    prefix = env("DM_PREFIX", default_prefix);
    const char *only = getenv("DM_FEATURES");
    if (only) {
        /* Every named feature must exist. */
        char *copy = strdup(only), *save = NULL;
        for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
            size_t i;
            for (i = 0; i < NFEATURES && strcmp(features[i].name, t) != 0; i++)
                ;
            if (i == NFEATURES) {
                fprintf(stderr, "DM_FEATURES names an unknown feature %s\n", t);
                return 2;
            }
        }
        free(copy);
    }
    signal(SIGPIPE, SIG_IGN);
    double start = now_ms();
    for (size_t i = 0; i < NFEATURES; i++) {
        if (!selected(only, features[i].name))
            continue;
        int left = PROGRAM_BUDGET_S - (int)((now_ms() - start) / 1000);
        if (left < 1) {
            printf("RESULT %s FAILED not run: earlier features spent the program's %d s\n", features[i].name,
                   PROGRAM_BUDGET_S);
            fflush(stdout);
            continue;
        }
        run_feature(i, left < FEATURE_TIMEOUT_S ? left : FEATURE_TIMEOUT_S);
    }
    return 0;
}
