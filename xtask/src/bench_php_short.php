<?php
// One PHP worker of `cargo xtask bench proxy`'s short-connection case: what a PHP-FPM worker does
// for each web request without persistent connections (phpredis `connect`, not `pconnect`):
// new Redis, connect, AUTH, GET, SET, INCR, close. The bench sets `php:key` to `php-value` first. Runs until the deadline, then writes
// {"ok", "errors", "first_error", "elapsed_ns", "lat_us": [...]} as JSON to the output file.
//
// Usage: php bench_php_short.php HOST PORT PASSWORD SECONDS OUT_FILE WORKER_ID

if ($argc !== 7) {
    fwrite(STDERR, "usage: php bench_php_short.php HOST PORT PASSWORD SECONDS OUT_FILE WORKER_ID\n");
    exit(2);
}
[, $host, $port, $password, $seconds, $out, $worker] = $argv;
$port = (int) $port;

$lat = [];
$errors = 0;
$first_error = '';
$n = 0;
$start = hrtime(true);
$deadline = $start + (int) ((float) $seconds * 1e9);
while (hrtime(true) < $deadline) {
    $t0 = hrtime(true);
    try {
        $r = new Redis();
        if (!$r->connect($host, $port, 2.0, null, 0, 2.0)) {
            throw new Exception('connect failed');
        }
        if (!$r->auth($password)) {
            throw new Exception('AUTH failed: ' . $r->getLastError());
        }
        $v = $r->get('php:key');
        if ($v !== 'php-value') {
            throw new Exception('GET answered ' . var_export($v, true));
        }
        if ($r->set("php:worker:$worker", (string) $n) !== true) {
            throw new Exception('SET failed: ' . $r->getLastError());
        }
        if (!is_int($r->incr('php:requests'))) {
            throw new Exception('INCR failed: ' . $r->getLastError());
        }
        $r->close();
        $lat[] = intdiv(hrtime(true) - $t0, 1000);
    } catch (Throwable $e) {
        $errors++;
        if ($first_error === '') {
            $first_error = $e->getMessage();
        }
    }
    $n++;
}
$result = [
    'ok' => count($lat),
    'errors' => $errors,
    'first_error' => $first_error,
    'elapsed_ns' => hrtime(true) - $start,
    'lat_us' => $lat,
];
if (file_put_contents($out, json_encode($result)) === false) {
    fwrite(STDERR, "cannot write $out\n");
    exit(1);
}
