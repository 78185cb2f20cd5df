<?php
// phpredis client program of the compatibility test (tests/clients/README.md has the contract).
//
// Each feature runs in a forked child (pcntl) with its own connections and a 10 s deadline, and
// prints exactly one `RESULT <feature> <status> <detail>` line. phpredis reports a server error
// as `false` plus getLastError() (or a RedisException): both become `refused` with the text.
// Two features are PHP's own: `php_per_request` (what PHP-FPM does per request) and
// `pconnect` (persistent connections and their liveness check).

$HOST = getenv('DM_HOST');
$PORT = (int) getenv('DM_PORT');
$USER = getenv('DM_USER');
$PASSWORD = getenv('DM_PASSWORD');
$TOPOLOGY = getenv('DM_TOPOLOGY') ?: 'standalone';
$PREFIX = getenv('DM_PREFIX');
const FEATURE_SECS = 10;

class Status extends Exception
{
    public $status;
    public function __construct($status, $detail)
    {
        parent::__construct($detail);
        $this->status = $status;
    }
}

/** A server error: `refused` with its text. */
class Refused extends Exception
{
}

function dmkey($name)
{
    global $TOPOLOGY, $PREFIX;
    // One hash slot per run in cluster topology, so MULTI, scripts and BLPOP stay legal.
    return $TOPOLOGY === 'cluster' ? '{' . $PREFIX . '}' . $name : $PREFIX . $name;
}

function check($cond, $what)
{
    if (!$cond) {
        throw new Exception($what);
    }
}

/** Fails with `refused` when $r's last reply was an error, else with $what. */
function ok($r, $value, $what)
{
    if ($value === false && $r->getLastError() !== null) {
        throw new Refused($what . ': ' . $r->getLastError());
    }
    return $value;
}

function conn($auth = true)
{
    global $HOST, $PORT, $USER, $PASSWORD;
    $r = new Redis();
    check($r->connect($HOST, $PORT, 5.0, null, 0, 8.0), "connect to $HOST:$PORT");
    if ($auth) {
        ok($r, $r->auth([$USER, $PASSWORD]), 'AUTH');
    }
    return $r;
}

/** Runs $fn in a child process (the concurrent "other client" of a feature). */
function in_child($fn)
{
    $pid = pcntl_fork();
    if ($pid === 0) {
        try {
            $fn();
        } catch (Throwable $e) {
            fwrite(STDERR, "child: " . $e->getMessage() . "\n");
        }
        posix_kill(posix_getpid(), SIGKILL);
    }
    return $pid;
}

function f_auth()
{
    global $HOST, $PORT, $USER, $PASSWORD;
    $r = conn();
    check($r->ping() === true, 'PING');
    $bad = new Redis();
    $bad->connect($HOST, $PORT, 5.0);
    try {
        $bad->auth([$USER, $PASSWORD . '-wrong']);
        throw new Exception('a wrong password was accepted');
    } catch (RedisException $e) {
        check(strpos($e->getMessage(), 'WRONGPASS') === 0, 'error ' . $e->getMessage());
    }
    return 'auth([user, pass]); wrong password: RedisException WRONGPASS';
}

function f_select()
{
    $k = dmkey('select');
    $r = conn();
    ok($r, $r->select(2), 'SELECT 2');
    check($r->set($k, 'in-db-2') === true, 'SET in db 2');
    check($r->get($k) === 'in-db-2', 'GET in db 2');
    $r0 = conn();
    check($r0->get($k) === false, 'the db-2 key is visible in db 0');
    $r->del($k);
    return 'select(2)';
}

function f_pipeline()
{
    $r = conn();
    $p = $r->pipeline();
    for ($i = 0; $i < 100; $i++) {
        $p->set(dmkey("p$i"), "v$i");
    }
    for ($i = 0; $i < 100; $i++) {
        $p->get(dmkey("p$i"));
    }
    $got = $p->exec();
    $want = array_merge(array_fill(0, 100, true), array_map(fn($i) => "v$i", range(0, 99)));
    check($got === $want, 'pipeline replies ' . json_encode(array_slice((array) $got, 0, 4)));
    return 'pipeline(): 100 SET + 100 GET';
}

function f_transaction()
{
    $r = conn();
    $other = conn();
    $k = dmkey('tx');
    $r->del($k);
    $got = $r->multi()->set($k, 1)->incr($k)->exec();
    check($got === [true, 2], 'MULTI/SET/INCR/EXEC ' . json_encode($got));
    ok($r, $r->watch($k), 'WATCH');
    $other->set($k, 'changed');
    $got = $r->multi()->set($k, 'mine')->exec();
    check($got === false, 'EXEC after the WATCHed key changed answered ' . json_encode($got));
    check($r->get($k) === 'changed', 'the aborted transaction wrote');
    return 'multi()->exec(); WATCH abort: exec() === false';
}

/** Runs a (p)subscribe loop that the callback ends by closing the connection. */
function subscribe_once($subscribe, $cb)
{
    try {
        $subscribe($cb);
    } catch (RedisException $e) {
        if ($e->getMessage() !== 'Connection closed') {
            throw $e;
        }
    }
}

/**
 * A child that publishes $msg on $ch every 20 ms until it is stopped (the subscriber cannot
 * say when it is subscribed; PUBLISH's count is no signal in cluster topology, where it counts
 * one node's receivers).
 */
function publisher($ch, $msg)
{
    return in_child(function () use ($ch, $msg) {
        $b = conn();
        for ($i = 0; $i < 400; $i++) {
            $b->publish($ch, $msg);
            usleep(20000);
        }
    });
}

function stop($pid)
{
    posix_kill($pid, SIGKILL);
    pcntl_waitpid($pid, $st);
}

function f_pubsub()
{
    $ch = dmkey('ch');
    // phpredis blocks in subscribe(); a child publishes until both subscriptions got it.
    $pid = publisher($ch, 'hello');
    $a = conn();
    $a->setOption(Redis::OPT_READ_TIMEOUT, 5);
    $got = null;
    subscribe_once(function ($cb) use ($a, $ch) {
        $a->subscribe([$ch], $cb);
    }, function ($redis, $chan, $msg) use (&$got) {
        $got = [$chan, $msg];
        $redis->close(); // the only way out of phpredis 5.3's subscribe loop
    });
    stop($pid);
    check($got === [$ch, 'hello'], 'SUBSCRIBE received ' . json_encode($got));
    $pid = publisher($ch, 'hello-p');
    $a2 = conn();
    $a2->setOption(Redis::OPT_READ_TIMEOUT, 5);
    $got = null;
    subscribe_once(function ($cb) use ($a2) {
        $a2->psubscribe([dmkey('c*')], $cb);
    }, function ($redis, $pat, $chan, $msg) use (&$got) {
        $got = [$pat, $chan, $msg];
        $redis->close();
    });
    stop($pid);
    check($got === [dmkey('c*'), $ch, 'hello-p'], 'PSUBSCRIBE received ' . json_encode($got));
    return 'subscribe()/psubscribe() callbacks on two connections (each blocks its connection until the callback closes it)';
}

function f_blocking()
{
    $k = dmkey('bl');
    $a = conn();
    $a->del($k);
    $pid = in_child(function () use ($k) {
        usleep(200000);
        conn()->rPush($k, 'v');
    });
    $got = $a->blPop([$k], 5);
    pcntl_waitpid($pid, $st);
    check($got === [$k, 'v'], 'BLPOP got ' . json_encode($got));
    $t0 = microtime(true);
    // phpredis 5.3 takes an integer timeout; 0.5 s needs the raw command.
    $got = $a->rawCommand('BLPOP', dmkey('bl-empty'), '0.5');
    // phpredis turns the null array into an empty one.
    check($got === [] || $got === false || $got === null, 'BLPOP on an empty key ' . json_encode($got));
    check(microtime(true) - $t0 >= 0.4, 'BLPOP 0.5 returned early');
    return 'blPop 5 woken by RPUSH; BLPOP 0.5 -> null';
}

function f_scripts()
{
    $r = conn();
    $k = dmkey('s');
    $got = ok($r, $r->eval('return {KEYS[1], ARGV[1]}', [$k, 'arg'], 1), 'EVAL');
    check($got === [$k, 'arg'], 'EVAL ' . json_encode($got));
    $sha = ok($r, $r->script('load', "return 'loaded'"), 'SCRIPT LOAD');
    check(ok($r, $r->evalSha($sha), 'EVALSHA') === 'loaded', 'EVALSHA');
    $r->clearLastError();
    check($r->evalSha(str_repeat('0', 40)) === false, 'EVALSHA of an unknown sha succeeded');
    check(strpos((string) $r->getLastError(), 'NOSCRIPT') === 0, 'error ' . $r->getLastError());
    return 'eval, script(load) + evalSha, NOSCRIPT';
}

function f_large_value()
{
    $r = conn();
    $k = dmkey('big');
    $all = '';
    for ($i = 0; $i < 256; $i++) {
        $all .= chr($i);
    }
    $value = str_repeat($all, 8 * 1024 * 1024 / 256);
    check(ok($r, $r->set($k, $value), 'SET 8 MiB') === true, 'SET 8 MiB');
    check($r->get($k) === $value, 'GET 8 MiB is not byte-exact');
    $r->del($k);
    $lk = dmkey('list');
    $r->del($lk);
    $items = array_map('strval', range(0, 99999));
    check(ok($r, $r->rPush($lk, ...$items), 'RPUSH') === 100000, 'RPUSH 100000');
    check($r->lRange($lk, 0, -1) === $items, 'LRANGE 0 -1');
    $r->del($lk);
    return '8 MiB value, 100000-element list';
}

function f_resp3()
{
    throw new Status('na', 'phpredis 5.3 speaks RESP2 only');
}

function client_id($r)
{
    return ok($r, $r->rawCommand('CLIENT', 'ID'), 'CLIENT ID');
}

function kill_id($by, $id)
{
    $n = ok($by, $by->rawCommand('CLIENT', 'KILL', 'ID', (string) $id), 'CLIENT KILL ID');
    check($n === 1, 'CLIENT KILL ID answered ' . json_encode($n));
}

function f_reconnect()
{
    $a = conn();
    $b = conn();
    $id = client_id($a);
    kill_id($b, $id);
    // phpredis notices the closed socket before it writes and reconnects (AUTH included).
    try {
        check($a->ping() === true, 'PING after the kill');
        check(client_id($a) !== $id, 'the connection was not replaced');
        return 'phpredis reconnects before the next command (AUTH again)';
    } catch (RedisException $e) {
        // Against Redis the killed socket is closed before CLIENT KILL answers, so phpredis
        // sees the EOF before it writes; an exception here means it was closed later.
        check($a->ping() === true, 'PING after one retry');
        throw new Status('differs', 'the application sees RedisException "' . $e->getMessage()
            . '" once (the connection was closed after CLIENT KILL answered), the retry reconnects');
    }
}

function f_client_list()
{
    global $USER;
    $r = conn();
    $id = client_id($r);
    $list = ok($r, $r->client('list'), 'CLIENT LIST');
    $ids = array_map(fn($c) => (string) ($c['id'] ?? ''), (array) $list);
    check(in_array((string) $id, $ids, true), "CLIENT LIST lacks id=$id: " . json_encode($ids));
    $info = ok($r, $r->rawCommand('CLIENT', 'INFO'), 'CLIENT INFO');
    $fields = [];
    foreach (explode(' ', trim((string) $info)) as $kv) {
        $p = explode('=', $kv, 2);
        $fields[$p[0]] = $p[1] ?? '';
    }
    foreach (['id', 'addr', 'user', 'db', 'resp'] as $f) {
        check(isset($fields[$f]), "CLIENT INFO lacks $f: $info");
    }
    check($fields['id'] === (string) $id, "CLIENT INFO id {$fields['id']} vs CLIENT ID $id");
    check($fields['user'] === $USER, "CLIENT INFO user {$fields['user']}");
    check(ok($r, $r->client('setname', 'dm-php-list'), 'CLIENT SETNAME') === true, 'SETNAME');
    check($r->client('getname') === 'dm-php-list', 'GETNAME');
    return "client('list'), CLIENT INFO, client('setname'/'getname')";
}

function f_client_kill()
{
    $b = conn();
    $c = conn();
    $cid = client_id($c);
    kill_id($b, $cid);
    $a = conn();
    $name = 'dm-php-victim-' . getmypid();
    ok($a, $a->client('setname', $name), 'CLIENT SETNAME');
    $aid = client_id($a);
    $list = ok($b, $b->client('list'), 'CLIENT LIST');
    $found = array_values(array_filter((array) $list, fn($x) => ($x['name'] ?? '') === $name));
    check(count($found) === 1, 'CLIENT LIST shows ' . count($found) . " connections named $name");
    check(ok($b, $b->client('kill', $found[0]['addr']), 'CLIENT KILL addr') === true, 'CLIENT KILL addr');
    // A is closed: phpredis reconnects, so its next connection has another id and no name.
    try {
        $now = client_id($a);
    } catch (RedisException $e) {
        $now = null;
    }
    check($now !== $aid, 'the connection killed by address is still open');
    return "CLIENT KILL ID -> 1, client('kill', addr) -> true (found by name)";
}

function f_acl()
{
    global $HOST, $PORT, $USER;
    $r = conn();
    check(ok($r, $r->acl('WHOAMI'), 'ACL WHOAMI') === $USER, 'ACL WHOAMI');
    $users = ok($r, $r->acl('USERS'), 'ACL USERS');
    check(is_array($users) && in_array($USER, $users, true), 'ACL USERS ' . json_encode($users));
    $cats = ok($r, $r->acl('CAT'), 'ACL CAT');
    check(is_array($cats) && in_array('read', $cats, true), 'ACL CAT ' . json_encode($cats));
    $wrong = 'dm-wrong-' . getmypid();
    $bad = new Redis();
    $bad->connect($HOST, $PORT, 5.0);
    try {
        $bad->auth([$wrong, 'nope']);
        throw new Exception('AUTH as an unknown user succeeded');
    } catch (RedisException $e) {
    }
    $log = ok($r, $r->acl('LOG', 10), 'ACL LOG');
    $entry = null;
    foreach ((array) $log as $e) {
        if (is_array($e) && !isset($e['username'])) {
            // A flat [k, v, k, v, ...] entry.
            $m = [];
            for ($i = 0; $i + 1 < count($e); $i += 2) {
                $m[$e[$i]] = $e[$i + 1];
            }
            $e = $m;
        }
        if (($e['username'] ?? null) === $wrong) {
            $entry = $e;
            break;
        }
    }
    check($entry !== null && $entry['reason'] === 'auth', 'ACL LOG ' . json_encode(array_slice((array) $log, 0, 2)));
    return 'acl(WHOAMI/USERS/CAT/LOG)';
}

function f_cluster_client()
{
    global $HOST, $PORT, $USER, $PASSWORD, $PREFIX;
    try {
        $rc = new RedisCluster(null, ["$HOST:$PORT"], 5.0, 8.0, false, [$USER, $PASSWORD]);
    } catch (RedisClusterException $e) {
        throw new Status('refused', 'RedisCluster: ' . $e->getMessage());
    }
    for ($i = 0; $i < 10; $i++) {
        check($rc->set($PREFIX . "cc$i", "v$i") === true, 'SET');
    }
    for ($i = 0; $i < 10; $i++) {
        check($rc->get($PREFIX . "cc$i") === "v$i", 'GET');
    }
    $masters = $rc->_masters();
    if (count($masters) === 1) {
        throw new Status('differs', 'one-node cluster: ' . implode(':', $masters[0]));
    }
    return count($masters) . ' masters';
}

function f_php_per_request()
{
    $t0 = microtime(true);
    for ($i = 0; $i < 200; $i++) {
        $r = conn();
        $k = dmkey('req' . ($i % 10));
        check($r->set($k, "r$i") === true, "request $i SET");
        check($r->get($k) === "r$i", "request $i GET");
        $r->close();
    }
    return sprintf('200 x connect+AUTH+SET+GET+close in %.2f s', microtime(true) - $t0);
}

function pconn()
{
    global $HOST, $PORT, $USER, $PASSWORD;
    $r = new Redis();
    check($r->pconnect($HOST, $PORT, 5.0, 'dm', 0, 8.0), 'pconnect');
    ok($r, $r->auth([$USER, $PASSWORD]), 'AUTH');
    return $r;
}

function f_pconnect()
{
    $a = pconn();
    $id1 = client_id($a);
    unset($a);
    $b = pconn();
    $id2 = client_id($b);
    check($id1 === $id2, "a second pconnect opened a new connection (CLIENT ID $id1 then $id2)");
    unset($b);
    kill_id(conn(), $id1);
    $c = pconn();
    check($c->set(dmkey('pc'), 'after-kill') === true, 'SET after the pooled connection was killed');
    check($c->get(dmkey('pc')) === 'after-kill', 'GET after the kill');
    check(client_id($c) !== $id1, 'still the killed connection');
    return 'pconnect reuses one connection; after CLIENT KILL the liveness check reconnects';
}

$FEATURES = [
    'auth', 'select', 'pipeline', 'transaction', 'pubsub', 'blocking', 'scripts', 'large_value',
    'resp3', 'reconnect', 'client_list', 'client_kill', 'acl', 'cluster_client',
    'php_per_request', 'pconnect',
];

function one_line($s)
{
    return substr(preg_replace('/\s+/', ' ', trim((string) $s)), 0, 300);
}

function run_feature($name)
{
    try {
        $detail = call_user_func("f_$name");
        $status = 'works';
    } catch (Status $s) {
        [$status, $detail] = [$s->status, $s->getMessage()];
    } catch (Refused $e) {
        [$status, $detail] = ['refused', $e->getMessage()];
    } catch (Throwable $e) {
        fwrite(STDERR, "$name: $e\n");
        [$status, $detail] = ['FAILED', get_class($e) . ': ' . $e->getMessage()];
    }
    echo "RESULT $name $status " . one_line($detail) . "\n";
}

echo 'phpredis ' . phpversion('redis') . ", $HOST:$PORT topology=$TOPOLOGY mode=" . getenv('DM_MODE') . "\n";
$wanted = array_filter(explode(' ', (string) getenv('DM_FEATURES')));
foreach ($FEATURES as $name) {
    if ($wanted && !in_array($name, $wanted, true)) {
        continue;
    }
    $pid = pcntl_fork();
    if ($pid === 0) {
        run_feature($name);
        exit(0);
    }
    $deadline = microtime(true) + FEATURE_SECS;
    while (true) {
        $done = pcntl_waitpid($pid, $st, WNOHANG);
        if ($done === $pid) {
            if (!pcntl_wifexited($st) || pcntl_wexitstatus($st) !== 0) {
                echo "RESULT $name FAILED the feature's process ended with status $st\n";
            }
            break;
        }
        if (microtime(true) > $deadline) {
            posix_kill($pid, SIGKILL);
            pcntl_waitpid($pid, $st);
            echo "RESULT $name FAILED timed out after " . FEATURE_SECS . " s\n";
            break;
        }
        usleep(10000);
    }
}
