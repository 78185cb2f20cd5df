// redigo (Debian golang-github-gomodule-redigo-dev 1.8.3) as its users drive it: redis.Dial with
// DialUsername/DialPassword/DialDatabase, Do, Send/Flush/Receive pipelines, redis.Pool with
// TestOnBorrow, PubSubConn, redis.NewScript. The contract (env, RESULT lines, features) is in
// tests/clients/README.md; expected values are what redis-server 7.0 answers.
package main

import (
	"bytes"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/gomodule/redigo/redis"
)

var features = []string{
	"auth", "select", "pipeline", "transaction", "pubsub", "blocking", "scripts",
	"large_value", "resp3", "reconnect", "client_list", "client_kill", "acl", "cluster_client",
}

const featureTimeout = 10 * time.Second

// programBudget keeps the whole program under the contract's 60 s even if every feature hangs.
const programBudget = 55 * time.Second

type config struct {
	addr, user, password, topology, mode, prefix string
}

var cfg config

// outcome is a status other than works (or refused/FAILED, which errors decide).
type outcome struct{ status, detail string }

func (o outcome) Error() string { return o.detail }

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	if fallback == "" {
		fmt.Fprintf(os.Stderr, "environment variable %s is not set (see tests/clients/README.md)\n", name)
		os.Exit(2)
	}
	return fallback
}

func key(name string) string {
	if cfg.topology == "cluster" {
		return "{" + cfg.prefix + "}:" + name
	}
	return cfg.prefix + ":" + name
}

// conns collects what a feature dialed, closed after the feature (also after a timeout).
type conns struct{ list []interface{ Close() error } }

func (cs *conns) add(c interface{ Close() error }) { cs.list = append(cs.list, c) }
func (cs *conns) closeAll() {
	for _, c := range cs.list {
		c.Close()
	}
}

func (cs *conns) dial(extra ...redis.DialOption) (redis.Conn, error) {
	opts := append([]redis.DialOption{
		redis.DialUsername(cfg.user),
		redis.DialPassword(cfg.password),
		redis.DialConnectTimeout(5 * time.Second),
		redis.DialReadTimeout(8 * time.Second),
		redis.DialWriteTimeout(8 * time.Second),
	}, extra...)
	c, err := redis.Dial("tcp", cfg.addr, opts...)
	if err != nil {
		return nil, err
	}
	cs.add(c)
	return c, nil
}

func show(v interface{}) string {
	switch x := v.(type) {
	case []byte:
		if len(x) > 100 {
			return fmt.Sprintf("<%d bytes>", len(x))
		}
		return strconv.Quote(string(x))
	case []interface{}:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = show(e)
		}
		s := "[" + strings.Join(parts, " ") + "]"
		if len(s) > 200 {
			s = s[:200] + "..."
		}
		return s
	case nil:
		return "nil"
	}
	return fmt.Sprintf("%#v", v)
}

func eq(what string, got, want interface{}) error {
	if !reflect.DeepEqual(got, want) {
		return fmt.Errorf("%s: got %s, expected %s", what, show(got), show(want))
	}
	return nil
}

// expectErr wants a server error reply containing needle.
func expectErr(what string, reply interface{}, err error, needle string) error {
	var re redis.Error
	if errors.As(err, &re) && strings.Contains(re.Error(), needle) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: expected a %s error, got %T: %v", what, needle, err, err)
	}
	return fmt.Errorf("%s: expected a %s error, got the reply %s", what, needle, show(reply))
}

func bs(s ...string) []interface{} {
	out := make([]interface{}, len(s))
	for i, x := range s {
		out[i] = []byte(x)
	}
	return out
}

func featAuth(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	pong, err := redis.String(c.Do("PING"))
	if err != nil {
		return "", err
	}
	if err := eq("PING", pong, "PONG"); err != nil {
		return "", err
	}
	_, err = cs.dial(redis.DialPassword(cfg.password + "-wrong"))
	if err := expectErr("dial with a wrong password", nil, err, "WRONGPASS"); err != nil {
		return "", err
	}
	return "DialUsername/DialPassword; wrong password: WRONGPASS from Dial", nil
}

func featSelect(cs *conns) (string, error) {
	c, err := cs.dial(redis.DialDatabase(2))
	if err != nil {
		return "", err
	}
	k := key("select")
	if _, err := c.Do("SET", k, "in-db-2"); err != nil {
		return "", err
	}
	v, err := redis.String(c.Do("GET", k))
	if err != nil {
		return "", err
	}
	if err := eq("GET in db 2", v, "in-db-2"); err != nil {
		return "", err
	}
	c0, err := cs.dial()
	if err != nil {
		return "", err
	}
	v0, err := c0.Do("GET", k)
	if err != nil {
		return "", err
	}
	if err := eq("GET in db 0", v0, nil); err != nil {
		return "", err
	}
	c.Do("DEL", k)
	return "DialDatabase(2)", nil
}

func featPipeline(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	for i := 0; i < 100; i++ {
		if err := c.Send("SET", key(fmt.Sprintf("pipe:%d", i)), fmt.Sprintf("v%d", i)); err != nil {
			return "", err
		}
	}
	for i := 0; i < 100; i++ {
		if err := c.Send("GET", key(fmt.Sprintf("pipe:%d", i))); err != nil {
			return "", err
		}
	}
	if err := c.Flush(); err != nil {
		return "", err
	}
	for i := 0; i < 200; i++ {
		r, err := c.Receive()
		if err != nil {
			return "", err
		}
		var want interface{} = "OK"
		if i >= 100 {
			want = []byte(fmt.Sprintf("v%d", i-100))
		}
		if err := eq(fmt.Sprintf("pipelined reply %d", i), r, want); err != nil {
			return "", err
		}
	}
	// Do("") flushes and collects what was sent.
	for i := 0; i < 100; i++ {
		c.Send("DEL", key(fmt.Sprintf("pipe:%d", i)))
	}
	all, err := redis.Values(c.Do(""))
	if err != nil {
		return "", err
	}
	if err := eq("replies collected by Do(\"\")", len(all), 100); err != nil {
		return "", err
	}
	return "200 commands with Send/Flush/Receive, 100 collected by Do(\"\")", nil
}

func featTransaction(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	k := key("tx")
	c.Send("MULTI")
	c.Send("SET", k, "10")
	c.Send("INCR", k)
	r, err := c.Do("EXEC")
	if err != nil {
		return "", err
	}
	if err := eq("MULTI SET INCR EXEC", r, []interface{}{"OK", int64(11)}); err != nil {
		return "", err
	}
	other, err := cs.dial()
	if err != nil {
		return "", err
	}
	if _, err := c.Do("WATCH", k); err != nil {
		return "", err
	}
	if _, err := other.Do("SET", k, "changed"); err != nil {
		return "", err
	}
	c.Send("MULTI")
	c.Send("SET", k, "mine")
	r, err = c.Do("EXEC")
	if err != nil {
		return "", err
	}
	if r != nil {
		return "", fmt.Errorf("EXEC after a watched key changed: got %s, expected nil (ErrNil)", show(r))
	}
	v, _ := redis.String(c.Do("GET", k))
	if err := eq("value after the aborted EXEC", v, "changed"); err != nil {
		return "", err
	}
	c.Do("DEL", k)
	return "MULTI/EXEC → [OK 11]; WATCH conflict → nil", nil
}

func featPubsub(cs *conns) (string, error) {
	sc, err := cs.dial()
	if err != nil {
		return "", err
	}
	pub, err := cs.dial()
	if err != nil {
		return "", err
	}
	psc := redis.PubSubConn{Conn: sc}
	ch, pat := cfg.prefix+":chan", cfg.prefix+":ch*"
	if err := psc.Subscribe(ch); err != nil {
		return "", err
	}
	if err := psc.PSubscribe(pat); err != nil {
		return "", err
	}
	want := []interface{}{
		redis.Subscription{Kind: "subscribe", Channel: ch, Count: 1},
		redis.Subscription{Kind: "psubscribe", Channel: pat, Count: 2},
	}
	for i, w := range want {
		got := psc.ReceiveWithTimeout(3 * time.Second)
		if err, ok := got.(error); ok {
			return "", err
		}
		if err := eq(fmt.Sprintf("subscription %d", i), got, w); err != nil {
			return "", err
		}
	}
	n, err := redis.Int(pub.Do("PUBLISH", ch, "hello"))
	if err != nil {
		return "", err
	}
	// Redis Cluster counts only the receivers on the node that took the PUBLISH.
	if cfg.topology != "cluster" {
		if err := eq("PUBLISH receivers", n, 2); err != nil {
			return "", err
		}
	}
	gotMsg, gotPmsg := false, false
	for i := 0; i < 2; i++ {
		switch m := psc.ReceiveWithTimeout(3 * time.Second).(type) {
		case redis.Message:
			if m.Pattern == "" {
				if err := eq("message", []interface{}{m.Channel, string(m.Data)}, []interface{}{ch, "hello"}); err != nil {
					return "", err
				}
				gotMsg = true
			} else {
				if err := eq("pmessage", []interface{}{m.Pattern, m.Channel, string(m.Data)}, []interface{}{pat, ch, "hello"}); err != nil {
					return "", err
				}
				gotPmsg = true
			}
		case error:
			return "", m
		default:
			return "", fmt.Errorf("unexpected pub/sub reply %#v", m)
		}
	}
	if !gotMsg || !gotPmsg {
		return "", fmt.Errorf("got message %v, pmessage %v", gotMsg, gotPmsg)
	}
	psc.Unsubscribe(ch)
	psc.PUnsubscribe(pat)
	for i := 0; i < 2; i++ {
		switch m := psc.ReceiveWithTimeout(3 * time.Second).(type) {
		case redis.Subscription:
			if i == 1 && m.Count != 0 {
				return "", fmt.Errorf("after unsubscribing from all: count %d", m.Count)
			}
		case error:
			return "", m
		default:
			return "", fmt.Errorf("unexpected pub/sub reply %#v", m)
		}
	}
	// Out of subscriber mode: ordinary commands on the same connection.
	pong, err := redis.String(sc.Do("PING"))
	if err != nil {
		return "", err
	}
	if err := eq("PING after unsubscribing", pong, "PONG"); err != nil {
		return "", err
	}
	// A connection out of subscriber mode serves keys again (redigo's Pool reuses it so): keys
	// on many slots (every node of a cluster).
	for i := 0; i < 10; i++ {
		k := fmt.Sprintf("%s:after-sub:%d", cfg.prefix, i)
		if _, err := sc.Do("SET", k, i); err != nil {
			return "", err
		}
		v, err := redis.Int(sc.Do("GET", k))
		if err != nil {
			return "", err
		}
		if err := eq("GET "+k+" after unsubscribing", v, i); err != nil {
			return "", err
		}
		sc.Do("DEL", k)
	}
	return fmt.Sprintf("PubSubConn: message + pmessage, back to commands; PUBLISH counted %d", n), nil
}

func featBlocking(cs *conns) (string, error) {
	a, err := cs.dial()
	if err != nil {
		return "", err
	}
	b, err := cs.dial()
	if err != nil {
		return "", err
	}
	k := key("blist")
	a.Do("DEL", k)
	started := time.Now()
	go func() {
		time.Sleep(200 * time.Millisecond)
		b.Do("RPUSH", k, "v")
	}()
	r, err := redis.Strings(a.Do("BLPOP", k, 5))
	if err != nil {
		return "", err
	}
	waited := time.Since(started)
	if err := eq("BLPOP", r, []string{k, "v"}); err != nil {
		return "", err
	}
	if waited < 150*time.Millisecond || waited > 4*time.Second {
		return "", fmt.Errorf("BLPOP returned after %v", waited)
	}
	t0 := time.Now()
	e, err := a.Do("BLPOP", key("empty"), 0.5)
	if err != nil {
		return "", err
	}
	t := time.Since(t0)
	if err := eq("BLPOP of an empty list, timeout 0.5", e, nil); err != nil {
		return "", err
	}
	if t < 400*time.Millisecond || t > 3*time.Second {
		return "", fmt.Errorf("BLPOP 0.5 returned after %v", t)
	}
	return fmt.Sprintf("BLPOP woke after %d ms; empty → nil after %d ms", waited.Milliseconds(), t.Milliseconds()), nil
}

func featScripts(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	k := key("script")
	body := "return {KEYS[1], ARGV[1]}"
	r, err := c.Do("EVAL", body, 1, k, "arg")
	if err != nil {
		return "", err
	}
	if err := eq("EVAL", r, bs(k, "arg")); err != nil {
		return "", err
	}
	sha, err := redis.String(c.Do("SCRIPT", "LOAD", body))
	if err != nil {
		return "", err
	}
	sum := sha1.Sum([]byte(body))
	if err := eq("SCRIPT LOAD", sha, hex.EncodeToString(sum[:])); err != nil {
		return "", err
	}
	r, err = c.Do("EVALSHA", sha, 1, k, "x")
	if err != nil {
		return "", err
	}
	if err := eq("EVALSHA", r, bs(k, "x")); err != nil {
		return "", err
	}
	r, err = c.Do("EVALSHA", "ffffffffffffffffffffffffffffffffffffffff", 1, k, "x")
	if err := expectErr("EVALSHA of an unknown sha", r, err, "NOSCRIPT"); err != nil {
		return "", err
	}
	// redis.NewScript: EVALSHA, EVAL on NOSCRIPT (redigo's usual way to run scripts).
	s := redis.NewScript(1, `return {KEYS[1], ARGV[1], "script"}`)
	for _, arg := range []string{"y", "z"} {
		r, err = s.Do(c, k, arg)
		if err != nil {
			return "", err
		}
		if err := eq("Script.Do", r, bs(k, arg, "script")); err != nil {
			return "", err
		}
	}
	return "EVAL, SCRIPT LOAD + EVALSHA, NOSCRIPT, NewScript", nil
}

func bigValue() []byte {
	b := make([]byte, 8*1024*1024)
	for i := range b {
		b[i] = byte(i*7 + i>>16)
	}
	return b
}

func featLargeValue(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	k := key("big")
	v := bigValue()
	if _, err := c.Do("SET", k, v); err != nil {
		return "", err
	}
	got, err := redis.Bytes(c.Do("GET", k))
	if err != nil {
		return "", err
	}
	if !bytes.Equal(got, v) {
		return "", fmt.Errorf("GET 8 MiB: %d bytes, not byte-exact", len(got))
	}
	c.Do("DEL", k)
	l := key("biglist")
	args := redis.Args{l}
	for i := 0; i < 100000; i++ {
		args = args.Add(fmt.Sprintf("item-%d", i))
	}
	n, err := redis.Int(c.Do("RPUSH", args...))
	if err != nil {
		return "", err
	}
	if err := eq("RPUSH 100000", n, 100000); err != nil {
		return "", err
	}
	back, err := redis.Strings(c.Do("LRANGE", l, 0, -1))
	if err != nil {
		return "", err
	}
	if err := eq("LRANGE length", len(back), 100000); err != nil {
		return "", err
	}
	for i, x := range back {
		if x != fmt.Sprintf("item-%d", i) {
			return "", fmt.Errorf("LRANGE[%d] = %q", i, x)
		}
	}
	c.Do("DEL", l)
	return "8 MiB binary value, 100000-element list", nil
}

func featResp3(*conns) (string, error) {
	return "", outcome{"na", "redigo 1.8.3 speaks RESP2 only (no HELLO 3 support)"}
}

func featReconnect(cs *conns) (string, error) {
	pool := &redis.Pool{
		MaxIdle:     2,
		IdleTimeout: time.Minute,
		Dial:        func() (redis.Conn, error) { return cs.dial() },
		// The liveness test applications configure: PING before reuse.
		TestOnBorrow: func(c redis.Conn, t time.Time) error {
			_, err := c.Do("PING")
			return err
		},
	}
	cs.add(pool)
	b, err := cs.dial()
	if err != nil {
		return "", err
	}
	k := key("reconnect")
	a := pool.Get()
	if _, err := a.Do("SET", k, "still-here"); err != nil {
		return "", err
	}
	id, err := redis.Int64(a.Do("CLIENT", "ID"))
	if err != nil {
		return "", err
	}
	a.Close() // back to the pool, idle
	n, err := redis.Int(b.Do("CLIENT", "KILL", "ID", id))
	if err != nil {
		return "", err
	}
	if err := eq("CLIENT KILL ID", n, 1); err != nil {
		return "", err
	}
	time.Sleep(100 * time.Millisecond)
	// The application's next request: TestOnBorrow finds the pooled connection dead, the pool
	// dials a new one.
	a2 := pool.Get()
	defer a2.Close()
	v, err := redis.String(a2.Do("GET", k))
	if err != nil {
		return "", err
	}
	if err := eq("GET after the kill", v, "still-here"); err != nil {
		return "", err
	}
	id2, err := redis.Int64(a2.Do("CLIENT", "ID"))
	if err != nil {
		return "", err
	}
	if id2 == id {
		return "", fmt.Errorf("the pool handed out the killed connection %d again", id)
	}
	a2.Do("DEL", k)
	return fmt.Sprintf("Pool with TestOnBorrow PING: killed id %d, next request on id %d", id, id2), nil
}

var fieldRe = regexp.MustCompile(`([^\s=]+)=(\S*)`)

func fields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range fieldRe.FindAllStringSubmatch(line, -1) {
		m[f[1]] = f[2]
	}
	return m
}

func safeName(suffix string) string {
	return regexp.MustCompile(`[^A-Za-z0-9:_-]`).ReplaceAllString(cfg.prefix, "_") + suffix
}

func featClientList(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	id, err := redis.Int64(c.Do("CLIENT", "ID"))
	if err != nil {
		return "", err
	}
	list, err := redis.String(c.Do("CLIENT", "LIST"))
	if err != nil {
		return "", err
	}
	found := false
	for _, l := range strings.Split(list, "\n") {
		if strings.HasPrefix(l, fmt.Sprintf("id=%d ", id)) {
			found = true
		}
	}
	if !found {
		return "", fmt.Errorf("CLIENT LIST has no line id=%d: %q", id, list)
	}
	infoLine, err := redis.String(c.Do("CLIENT", "INFO"))
	if err != nil {
		return "", err
	}
	info := fields(infoLine)
	if err := eq("CLIENT INFO id", info["id"], strconv.FormatInt(id, 10)); err != nil {
		return "", err
	}
	if _, _, err := net.SplitHostPort(info["addr"]); err != nil {
		return "", fmt.Errorf("CLIENT INFO addr %q: %v", info["addr"], err)
	}
	for f, want := range map[string]string{"user": cfg.user, "db": "0", "resp": "2"} {
		if err := eq("CLIENT INFO "+f, info[f], want); err != nil {
			return "", err
		}
	}
	name := safeName("-list")
	if _, err := c.Do("CLIENT", "SETNAME", name); err != nil {
		return "", err
	}
	got, err := redis.String(c.Do("CLIENT", "GETNAME"))
	if err != nil {
		return "", err
	}
	if err := eq("CLIENT GETNAME", got, name); err != nil {
		return "", err
	}
	n, err := cs.dial(redis.DialClientName(name + "-opt"))
	if err != nil {
		return "", err
	}
	got, err = redis.String(n.Do("CLIENT", "GETNAME"))
	if err != nil {
		return "", err
	}
	if err := eq("DialClientName", got, name+"-opt"); err != nil {
		return "", err
	}
	return fmt.Sprintf("id %d, addr %s", id, info["addr"]), nil
}

// closed tells whether the server closed c: its next command fails with a connection error.
func closed(c redis.Conn) error {
	_, err := c.Do("PING")
	var re redis.Error
	if err == nil || errors.As(err, &re) {
		return fmt.Errorf("the killed connection still answers (%v)", err)
	}
	return nil
}

func featClientKill(cs *conns) (string, error) {
	name := safeName("-victim")
	a, err := cs.dial(redis.DialClientName(name))
	if err != nil {
		return "", err
	}
	b, err := cs.dial()
	if err != nil {
		return "", err
	}
	list, err := redis.String(b.Do("CLIENT", "LIST"))
	if err != nil {
		return "", err
	}
	addr := ""
	for _, l := range strings.Split(list, "\n") {
		if f := fields(l); f["name"] == name {
			addr = f["addr"]
		}
	}
	if addr == "" {
		return "", fmt.Errorf("CLIENT LIST has no name=%s: %q", name, list)
	}
	ok, err := redis.String(b.Do("CLIENT", "KILL", addr))
	if err != nil {
		return "", err
	}
	if err := eq("CLIENT KILL "+addr, ok, "OK"); err != nil {
		return "", err
	}
	if err := closed(a); err != nil {
		return "", err
	}
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	id, err := redis.Int64(c.Do("CLIENT", "ID"))
	if err != nil {
		return "", err
	}
	n, err := redis.Int(b.Do("CLIENT", "KILL", "ID", id))
	if err != nil {
		return "", err
	}
	if err := eq("CLIENT KILL ID", n, 1); err != nil {
		return "", err
	}
	if err := closed(c); err != nil {
		return "", err
	}
	return fmt.Sprintf("killed %s (old form) and id %d", addr, id), nil
}

func featACL(cs *conns) (string, error) {
	c, err := cs.dial()
	if err != nil {
		return "", err
	}
	who, err := redis.String(c.Do("ACL", "WHOAMI"))
	if err != nil {
		return "", err
	}
	if err := eq("ACL WHOAMI", who, cfg.user); err != nil {
		return "", err
	}
	contains := func(what, cmd, want string) (int, error) {
		xs, err := redis.Strings(c.Do("ACL", cmd))
		if err != nil {
			return 0, err
		}
		for _, x := range xs {
			if x == want {
				return len(xs), nil
			}
		}
		return 0, fmt.Errorf("%s has no %s: %q", what, want, xs)
	}
	nusers, err := contains("ACL USERS", "USERS", cfg.user)
	if err != nil {
		return "", err
	}
	if _, err := contains("ACL CAT", "CAT", "read"); err != nil {
		return "", err
	}
	wrong := cfg.prefix + "-nosuchuser"
	r, err := c.Do("AUTH", wrong, "nopass")
	if err := expectErr("AUTH as an unknown user", r, err, "WRONGPASS"); err != nil {
		return "", err
	}
	entries, err := redis.Values(c.Do("ACL", "LOG", 50))
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		m, err := redis.StringMap(e, nil)
		if err != nil {
			// count and age-seconds are not strings; read the entry field by field.
			vals, err2 := redis.Values(e, nil)
			if err2 != nil {
				return "", err2
			}
			m = map[string]string{}
			for i := 0; i+1 < len(vals); i += 2 {
				k, _ := redis.String(vals[i], nil)
				switch v := vals[i+1].(type) {
				case []byte:
					m[k] = string(v)
				case int64:
					m[k] = strconv.FormatInt(v, 10)
				default:
					m[k] = fmt.Sprint(v)
				}
			}
		}
		if m["username"] != wrong {
			continue
		}
		if err := eq("ACL LOG reason", m["reason"], "auth"); err != nil {
			return "", err
		}
		if err := eq("ACL LOG context", m["context"], "toplevel"); err != nil {
			return "", err
		}
		return fmt.Sprintf("whoami %s; %d users; ACL LOG reason auth", who, nusers), nil
	}
	return "", fmt.Errorf("ACL LOG has no entry for %s (%d entries)", wrong, len(entries))
}

func featClusterClient(*conns) (string, error) {
	return "", outcome{"na", "redigo has no cluster mode"}
}

var impls = map[string]func(*conns) (string, error){
	"auth": featAuth, "select": featSelect, "pipeline": featPipeline,
	"transaction": featTransaction, "pubsub": featPubsub, "blocking": featBlocking,
	"scripts": featScripts, "large_value": featLargeValue, "resp3": featResp3,
	"reconnect": featReconnect, "client_list": featClientList, "client_kill": featClientKill,
	"acl": featACL, "cluster_client": featClusterClient,
}

type result struct {
	detail string
	err    error
}

func run(name string, timeout time.Duration) (status, detail string) {
	cs := &conns{}
	done := make(chan result, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				done <- result{"", fmt.Errorf("panic: %v", p)}
			}
		}()
		d, err := impls[name](cs)
		done <- result{d, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(timeout):
		res = result{"", fmt.Errorf("timeout after %v", timeout)}
	}
	cs.closeAll()
	var o outcome
	var re redis.Error
	switch {
	case res.err == nil:
		return "works", res.detail
	case errors.As(res.err, &o):
		return o.status, o.detail
	case errors.As(res.err, &re):
		return "refused", re.Error()
	default:
		return "FAILED", fmt.Sprintf("%T: %v", res.err, res.err)
	}
}

func main() {
	cfg = config{
		addr:     net.JoinHostPort(env("DM_HOST", ""), env("DM_PORT", "")),
		user:     env("DM_USER", ""),
		password: env("DM_PASSWORD", ""),
		topology: env("DM_TOPOLOGY", "standalone"),
		mode:     env("DM_MODE", "direct"),
		prefix:   env("DM_PREFIX", fmt.Sprintf("compat:%d", os.Getpid())),
	}
	selected := features
	if only := strings.Fields(os.Getenv("DM_FEATURES")); len(only) > 0 {
		selected = nil
		for _, f := range only {
			if impls[f] == nil {
				fmt.Fprintf(os.Stderr, "DM_FEATURES names an unknown feature %s\n", f)
				os.Exit(2)
			}
		}
		for _, f := range features {
			for _, o := range only {
				if f == o {
					selected = append(selected, f)
				}
			}
		}
	}
	programStart := time.Now()
	for _, name := range selected {
		left := programBudget - time.Since(programStart)
		if left < time.Second {
			fmt.Printf("RESULT %s FAILED not run: earlier features spent the program's %v\n", name, programBudget)
			continue
		}
		if left > featureTimeout {
			left = featureTimeout
		}
		started := time.Now()
		status, detail := run(name, left)
		detail = strings.Join(strings.Fields(detail), " ")
		fmt.Fprintf(os.Stderr, "[%s] %s in %d ms\n", name, status, time.Since(started).Milliseconds())
		fmt.Printf("RESULT %s %s %s\n", name, status, detail)
	}
}
