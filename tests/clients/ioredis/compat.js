'use strict';
// ioredis as its users drive it: `new Redis({host, port, username, password, db})`,
// pipeline(), multi(), duplicate() for a subscriber, defineCommand for scripts, its
// auto-reconnect, Redis.Cluster. The contract (env, RESULT lines, features) is in
// tests/clients/README.md; expected values are what redis-server 7.0 answers.

const common = require('../node/common.js');

const {
  nodeRequire, config, na, differs, expectEq, check, sleep, within, expectError, bigValue, runAll,
} = common;
const Redis = nodeRequire('ioredis');
const { ReplyError } = nodeRequire('redis-errors');
const keySlot = nodeRequire('cluster-key-slot');
const crypto = require('crypto');

const cfg = config();
const key = cfg.key;

const isServerError = (e) => e instanceof ReplyError
  || (e && e.name === 'ReplyError')
  || (e && e.lastNodeError instanceof ReplyError);

/// A client as applications create one; errors on the 'error' event are collected, not thrown.
function connect(track, extra = {}) {
  const r = new Redis({
    host: cfg.host,
    port: cfg.port,
    username: cfg.user,
    password: cfg.password,
    lazyConnect: true,
    connectTimeout: 5000,
    maxRetriesPerRequest: 2,
    ...extra,
  });
  r.seenErrors = [];
  r.on('error', (e) => r.seenErrors.push(e));
  return track(r);
}

async function connected(track, extra) {
  const r = connect(track, extra);
  await r.connect();
  return r;
}

/// Waits until `r` emitted 'end' (closed with no reconnect).
function ended(r, ms, what) {
  if (r.status === 'end') return Promise.resolve();
  return within(ms, what, new Promise((resolve) => r.once('end', resolve)));
}

const features = {
  async auth(track) {
    const r = await connected(track);
    expectEq('PING', await r.ping(), 'PONG');
    const bad = connect(track, { password: `${cfg.password}-wrong`, retryStrategy: () => null });
    // ioredis reports the refused AUTH on the 'error' event; connect() rejects.
    let connectErr;
    try {
      await bad.connect();
      await bad.ping();
    } catch (e) {
      connectErr = e;
    }
    const authErr = [connectErr, ...bad.seenErrors].find((e) => isServerError(e));
    check('a wrong password is refused', connectErr !== undefined && authErr !== undefined,
      `${connectErr}; events: ${bad.seenErrors.map(String).join(', ')}`);
    check('a wrong password is refused with WRONGPASS', authErr.message.includes('WRONGPASS'), authErr.message);
    return 'username/password options; wrong password: WRONGPASS on the error event';
  },

  async select(track) {
    const r = connect(track, { db: 2 });
    await r.connect();
    // ioredis SELECTs on connect and reports a refused SELECT on the 'error' event only.
    await r.ping();
    const selErr = r.seenErrors.find(isServerError);
    if (selErr) throw selErr;
    const k = key('select');
    expectEq('SET in db 2', await r.set(k, 'in-db-2'), 'OK');
    expectEq('GET in db 2', await r.get(k), 'in-db-2');
    const r0 = await connected(track);
    expectEq('GET in db 0', await r0.get(k), null);
    // select() switches an existing connection too.
    expectEq('SELECT 2', await r0.select(2), 'OK');
    expectEq('GET after select(2)', await r0.get(k), 'in-db-2');
    await r.del(k);
    return 'db option 2 and select(2)';
  },

  async pipeline(track) {
    const r = await connected(track);
    const p = r.pipeline();
    for (let i = 0; i < 100; i++) p.set(key(`pipe:${i}`), `v${i}`);
    for (let i = 0; i < 100; i++) p.get(key(`pipe:${i}`));
    const out = await p.exec();
    expectEq('pipeline length', out.length, 200);
    out.forEach(([err, v], i) => {
      if (err) throw err;
      expectEq(`pipeline reply ${i}`, v, i < 100 ? 'OK' : `v${i - 100}`);
    });
    // Auto-pipelining as well (commands of one tick in one write).
    const ap = await connected(track, { enableAutoPipelining: true });
    const got = await Promise.all(Array.from({ length: 100 }, (_x, i) => ap.get(key(`pipe:${i}`))));
    got.forEach((v, i) => expectEq(`auto-pipelined GET ${i}`, v, `v${i}`));
    const del = r.pipeline();
    for (let i = 0; i < 100; i++) del.del(key(`pipe:${i}`));
    await del.exec();
    return '200 commands in pipeline(), 100 auto-pipelined';
  },

  async transaction(track) {
    const r = await connected(track);
    const k = key('tx');
    const out = await r.multi().set(k, '10').incr(k).exec();
    expectEq('MULTI SET INCR EXEC', out, [[null, 'OK'], [null, 11]]);
    // Optimistic locking: WATCH, a change from another connection, EXEC aborts (null).
    const other = await connected(track);
    expectEq('WATCH', await r.watch(k), 'OK');
    expectEq('SET from another connection', await other.set(k, 'changed'), 'OK');
    const aborted = await r.multi().set(k, 'mine').exec();
    expectEq('EXEC after a watched key changed', aborted, null);
    expectEq('value after the aborted EXEC', await r.get(k), 'changed');
    await r.del(k);
    return 'multi().exec() → [OK, 11]; WATCH conflict → null';
  },

  async pubsub(track) {
    const pub = await connected(track);
    const sub = track(pub.duplicate());
    sub.on('error', () => {});
    const ch = `${cfg.prefix}:chan`;
    const pat = `${cfg.prefix}:ch*`;
    const got = [];
    let wake;
    const two = new Promise((resolve) => { wake = resolve; });
    sub.on('message', (c, m) => { got.push(['message', c, m]); if (got.length >= 2) wake(); });
    sub.on('pmessage', (p, c, m) => { got.push(['pmessage', p, c, m]); if (got.length >= 2) wake(); });
    expectEq('SUBSCRIBE', await sub.subscribe(ch), 1);
    expectEq('PSUBSCRIBE', await sub.psubscribe(pat), 2);
    const receivers = await pub.publish(ch, 'hello');
    // Redis Cluster counts only the receivers on the node that took the PUBLISH.
    if (cfg.topology !== 'cluster') expectEq('PUBLISH receivers', receivers, 2);
    await within(3000, 'message and pmessage', two);
    got.sort((a, b) => a[0].localeCompare(b[0]));
    expectEq('received', got, [['message', ch, 'hello'], ['pmessage', pat, ch, 'hello']]);
    await sub.unsubscribe(ch);
    await sub.punsubscribe(pat);
    // Out of subscriber mode: ordinary commands again.
    expectEq('PING after unsubscribing', await sub.ping(), 'PONG');
    // Keys on many slots (every node of a cluster) on the connection that left subscriber mode.
    for (let i = 0; i < 10; i++) {
      const k = `${cfg.prefix}:after-sub:${i}`;
      expectEq(`SET ${k} after unsubscribing`, await sub.set(k, `x${i}`), 'OK');
      expectEq(`GET ${k} after unsubscribing`, await sub.get(k), `x${i}`);
      await sub.del(k);
    }
    return `duplicate() subscriber: message + pmessage, back to commands; PUBLISH counted ${receivers}`;
  },

  async blocking(track) {
    const a = await connected(track);
    const b = await connected(track);
    const k = key('blist');
    await a.del(k);
    const started = Date.now();
    const pop = a.blpop(k, 5);
    await sleep(200);
    expectEq('RPUSH', await b.rpush(k, 'v'), 1);
    expectEq('BLPOP', await pop, [k, 'v']);
    const waited = Date.now() - started;
    check('BLPOP returned after the push', waited >= 150 && waited < 4000, `${waited} ms`);
    const t0 = Date.now();
    expectEq('BLPOP of an empty list, timeout 0.5', await a.blpop(key('empty'), 0.5), null);
    const t = Date.now() - t0;
    check('BLPOP 0.5 waited about 0.5 s', t >= 400 && t < 3000, `${t} ms`);
    return `BLPOP woke after ${waited} ms; empty → null after ${t} ms`;
  },

  async scripts(track) {
    const r = await connected(track);
    const k = key('script');
    const body = 'return {KEYS[1], ARGV[1]}';
    expectEq('EVAL', await r.eval(body, 1, k, 'arg'), [k, 'arg']);
    const sha = await r.script('LOAD', body);
    expectEq('SCRIPT LOAD', sha, crypto.createHash('sha1').update(body).digest('hex'));
    expectEq('EVALSHA', await r.evalsha(sha, 1, k, 'x'), [k, 'x']);
    await expectError('EVALSHA of an unknown sha',
      r.evalsha('ffffffffffffffffffffffffffffffffffffffff', 1, k, 'x'), 'NOSCRIPT', isServerError);
    // defineCommand: EVALSHA first, EVAL on NOSCRIPT (ioredis's usual way to run scripts).
    r.defineCommand('echoKeyArg', { numberOfKeys: 1, lua: 'return {KEYS[1], ARGV[1], "defined"}' });
    expectEq('defineCommand', await r.echoKeyArg(k, 'y'), [k, 'y', 'defined']);
    expectEq('defineCommand again', await r.echoKeyArg(k, 'z'), [k, 'z', 'defined']);
    return 'eval, script load + evalsha, NOSCRIPT, defineCommand';
  },

  async large_value(track) {
    const r = await connected(track);
    const k = key('big');
    const v = bigValue();
    expectEq('SET 8 MiB', await r.set(k, v), 'OK');
    const got = await r.getBuffer(k);
    check('GET 8 MiB byte-exact', Buffer.isBuffer(got) && got.equals(v), got && got.length);
    await r.del(k);
    const l = key('biglist');
    const items = Array.from({ length: 100000 }, (_x, i) => `item-${i}`);
    expectEq('RPUSH 100000', await r.rpush(l, ...items), 100000);
    const back = await r.lrange(l, 0, -1);
    expectEq('LRANGE length', back.length, 100000);
    back.forEach((x, i) => { if (x !== items[i]) throw new Error(`LRANGE[${i}] = ${x}`); });
    await r.del(l);
    return '8 MiB binary value, 100000-element list';
  },

  async resp3() {
    throw na(`ioredis ${nodeRequire('ioredis/package.json').version} speaks RESP2 only (no HELLO 3 option)`);
  },

  async reconnect(track) {
    const a = await connected(track); // default retryStrategy: reconnects
    const b = await connected(track);
    const k = key('reconnect');
    await a.set(k, 'still-here');
    const id = await a.client('ID');
    expectEq('CLIENT KILL ID', await b.client('KILL', 'ID', String(id)), 1);
    await sleep(100);
    // The application's next command: ioredis reconnects (and re-AUTHs) on its own.
    expectEq('GET after the kill', await a.get(k), 'still-here');
    const id2 = await a.client('ID');
    check('a new connection after the kill', Number(id2) !== Number(id), id2);
    await a.del(k);
    return `auto-reconnect: killed id ${id}, next command on id ${id2}`;
  },

  async client_list(track) {
    const r = await connected(track);
    const id = await r.client('ID');
    check('CLIENT ID is an integer', Number.isInteger(id) && id > 0, id);
    const list = await r.client('LIST');
    const mine = list.split('\n').find((l) => l.startsWith(`id=${id} `));
    check(`CLIENT LIST has a line id=${id}`, mine !== undefined, list);
    const info = Object.fromEntries((await r.client('INFO')).trim().split(' ').map((f) => {
      const i = f.indexOf('=');
      return [f.slice(0, i), f.slice(i + 1)];
    }));
    expectEq('CLIENT INFO id', info.id, String(id));
    check('CLIENT INFO addr', /^[0-9.]+:[0-9]+$/.test(info.addr || ''), info.addr);
    expectEq('CLIENT INFO user', info.user, cfg.user);
    expectEq('CLIENT INFO db', info.db, '0');
    expectEq('CLIENT INFO resp', info.resp, '2');
    const name = `${cfg.prefix.replace(/[^A-Za-z0-9:_-]/g, '_')}-list`;
    expectEq('CLIENT SETNAME', await r.client('SETNAME', name), 'OK');
    expectEq('CLIENT GETNAME', await r.client('GETNAME'), name);
    // connectionName: ioredis names its connections itself.
    const n = await connected(track, { connectionName: `${name}-opt` });
    expectEq('connectionName option', await n.client('GETNAME'), `${name}-opt`);
    return `id ${id}, addr ${info.addr}`;
  },

  async client_kill(track) {
    const name = `${cfg.prefix.replace(/[^A-Za-z0-9:_-]/g, '_')}-victim`;
    const a = await connected(track, { connectionName: name, retryStrategy: () => null });
    const b = await connected(track);
    await a.ping();
    const list = await b.client('LIST');
    const line = list.split('\n').find((l) => l.includes(` name=${name} `));
    check(`CLIENT LIST has name=${name}`, line !== undefined, list);
    const addr = /(?:^| )addr=(\S+)/.exec(line)[1];
    const aEnded = ended(a, 3000, 'the connection killed by address to close');
    expectEq(`CLIENT KILL ${addr}`, await b.client('KILL', addr), 'OK');
    await aEnded;
    const c = await connected(track, { retryStrategy: () => null });
    const id = await c.client('ID');
    const cEnded = ended(c, 3000, 'the connection killed by id to close');
    expectEq('CLIENT KILL ID', await b.client('KILL', 'ID', String(id)), 1);
    await cEnded;
    return `killed ${addr} (old form) and id ${id}`;
  },

  async acl(track) {
    const r = await connected(track);
    expectEq('ACL WHOAMI', await r.acl('WHOAMI'), cfg.user);
    const users = await r.acl('USERS');
    check(`ACL USERS contains ${cfg.user}`, Array.isArray(users) && users.includes(cfg.user), users);
    const cats = await r.acl('CAT');
    check('ACL CAT contains read', Array.isArray(cats) && cats.includes('read'), cats);
    const wrongUser = `${cfg.prefix}-nosuchuser`;
    await expectError('AUTH as an unknown user', r.call('AUTH', wrongUser, 'nopass'), 'WRONGPASS', isServerError);
    const log = await r.acl('LOG', '50');
    check('ACL LOG is an array', Array.isArray(log) && log.length > 0, log);
    // RESP2: every entry is a flat [field, value, ...] list.
    const entries = log.map((e) => {
      const o = {};
      for (let i = 0; i + 1 < e.length; i += 2) o[e[i]] = e[i + 1];
      return o;
    });
    const mine = entries.find((e) => e.username === wrongUser);
    check(`ACL LOG has an entry for ${wrongUser}`, mine !== undefined, entries.slice(0, 3));
    expectEq('ACL LOG reason', mine.reason, 'auth');
    expectEq('ACL LOG context', mine.context, 'toplevel');
    check('ACL LOG count', Number.isInteger(mine.count) && mine.count >= 1, mine);
    return `whoami ${cfg.user}; ${users.length} users; ACL LOG reason auth`;
  },

  async cluster_client(track) {
    const cluster = track(new Redis.Cluster([{ host: cfg.host, port: cfg.port }], {
      redisOptions: { username: cfg.user, password: cfg.password, connectTimeout: 3000 },
      lazyConnect: true,
      clusterRetryStrategy: () => null,
      slotsRefreshTimeout: 3000,
      maxRedirections: 4,
    }));
    let lastError;
    cluster.on('error', (e) => { lastError = e; });
    try {
      await cluster.connect();
    } catch (e) {
      // "Failed to refresh slots cache": the server's own error is the last node error.
      if (e.lastNodeError) throw e.lastNodeError;
      if (lastError && lastError.lastNodeError) throw lastError.lastNodeError;
      throw e;
    }
    const slots = new Set();
    for (let i = 0; i < 10; i++) {
      const k = `${cfg.prefix}:cc:${i}`;
      expectEq(`SET ${k}`, await cluster.set(k, `v${i}`), 'OK');
      slots.add(keySlot(k));
    }
    for (let i = 0; i < 10; i++) {
      expectEq(`GET ${cfg.prefix}:cc:${i}`, await cluster.get(`${cfg.prefix}:cc:${i}`), `v${i}`);
    }
    for (let i = 0; i < 10; i++) await cluster.del(`${cfg.prefix}:cc:${i}`);
    const masters = cluster.nodes('master');
    const view = `${masters.length} master(s): ${masters.map((m) => `${m.options.host}:${m.options.port}`).join(' ')}`;
    if (masters.length === 1) throw differs(`one-node cluster view (${view}); 10 keys on ${slots.size} slots`);
    return `10 keys on ${slots.size} slots, ${view}`;
  },
};

function close(c) {
  c.disconnect();
}

runAll(cfg, features, isServerError, close)
  .then(() => process.exit(0))
  .catch((e) => {
    console.error(e);
    process.exit(2);
  });
