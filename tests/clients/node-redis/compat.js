'use strict';
// node-redis (the `redis` package, v5) as its users drive it: createClient({url | socket,
// username, password, database, RESP}), multi().exec(), pipelines with Promise.all and
// multi().execAsPipeline(), duplicate() for a subscriber, its reconnect strategy,
// createCluster. The contract (env, RESULT lines, features) is in tests/clients/README.md;
// expected values are what redis-server 7.0 answers.

const crypto = require('crypto');
const common = require('../node/common.js');

const {
  nodeRequire, config, differs, expectEq, check, sleep, within, expectError, bigValue, runAll,
} = common;
const redis = nodeRequire('redis');
const {
  createClient, createCluster, ErrorReply, WatchError, RESP_TYPES,
} = redis;

const cfg = config();
const key = cfg.key;
const VERSION = nodeRequire('@redis/client/package.json').version;

const isServerError = (e) => e instanceof ErrorReply;

function url(db) {
  const u = `redis://${encodeURIComponent(cfg.user)}:${encodeURIComponent(cfg.password)}@${cfg.host}:${cfg.port}`;
  return db === undefined ? u : `${u}/${db}`;
}

/// A client as applications create one (an 'error' listener is mandatory in node-redis).
function client(track, extra = {}) {
  const c = createClient({
    url: url(),
    ...extra,
    socket: { connectTimeout: 5000, ...(extra.socket || {}) },
  });
  c.seenErrors = [];
  c.on('error', (e) => c.seenErrors.push(e));
  return track(c);
}

/// A connected client. A handshake command the server refuses (AUTH, SELECT, ...) makes
/// node-redis emit the error and reconnect forever, connect() staying pending: the first such
/// error reply is the outcome.
async function connected(track, extra) {
  const c = client(track, extra);
  let onError;
  const refused = new Promise((_resolve, reject) => {
    onError = (e) => { if (isServerError(e)) reject(e); };
    c.on('error', onError);
  });
  try {
    await Promise.race([c.connect(), refused]);
  } finally {
    c.off('error', onError);
  }
  return c;
}

/// Resolves once `c` (with `reconnectStrategy: false`) is closed: node-redis then reports
/// SocketClosedUnexpectedlyError on 'error' and `isOpen` turns false (no 'end' event).
async function ended(c, ms, what) {
  const deadline = Date.now() + ms;
  while (c.isOpen) {
    if (Date.now() > deadline) throw new Error(`timeout after ${ms} ms: ${what}`);
    await sleep(20);
  }
}

const features = {
  async auth(track) {
    // The URL form (redis://user:pass@host:port) and the option form.
    const a = await connected(track);
    expectEq('PING (url)', await a.ping(), 'PONG');
    const b = await connected(track, {
      url: undefined,
      socket: { host: cfg.host, port: cfg.port },
      username: cfg.user,
      password: cfg.password,
    });
    expectEq('PING (options)', await b.ping(), 'PONG');
    const bad = client(track, {
      url: undefined,
      socket: { host: cfg.host, port: cfg.port, reconnectStrategy: false },
      username: cfg.user,
      password: `${cfg.password}-wrong`,
    });
    const msg = await expectError('connect with a wrong password', bad.connect(), 'WRONGPASS', isServerError);
    return `url and options; wrong password: ${msg.split(' ')[0]}`;
  },

  async select(track) {
    const c = await connected(track, { database: 2 });
    const k = key('select');
    expectEq('SET in db 2', await c.set(k, 'in-db-2'), 'OK');
    expectEq('GET in db 2', await c.get(k), 'in-db-2');
    const c0 = await connected(track);
    expectEq('GET in db 0', await c0.get(k), null);
    const u = await connected(track, { url: url(2) });
    expectEq('GET via redis://.../2', await u.get(k), 'in-db-2');
    expectEq('SELECT 2', await c0.select(2), undefined);
    expectEq('GET after select(2)', await c0.get(k), 'in-db-2');
    await c.del(k);
    return 'database option, /2 in the url, select(2)';
  },

  async pipeline(track) {
    const c = await connected(track);
    // Commands issued in one tick are written together (node-redis's implicit pipelining).
    const sets = Array.from({ length: 100 }, (_x, i) => c.set(key(`pipe:${i}`), `v${i}`));
    const gets = Array.from({ length: 100 }, (_x, i) => c.get(key(`pipe:${i}`)));
    const out = await Promise.all([...sets, ...gets]);
    out.forEach((v, i) => expectEq(`Promise.all reply ${i}`, v, i < 100 ? 'OK' : `v${i - 100}`));
    // An explicit pipeline without MULTI.
    const m = c.multi();
    for (let i = 0; i < 100; i++) m.set(key(`pipe:${i}`), `w${i}`);
    for (let i = 0; i < 100; i++) m.get(key(`pipe:${i}`));
    const out2 = await m.execAsPipeline();
    expectEq('execAsPipeline length', out2.length, 200);
    out2.forEach((v, i) => expectEq(`execAsPipeline reply ${i}`, v, i < 100 ? 'OK' : `w${i - 100}`));
    await c.del(Array.from({ length: 100 }, (_x, i) => key(`pipe:${i}`)));
    return '200 commands with Promise.all, 200 with execAsPipeline()';
  },

  async transaction(track) {
    const c = await connected(track);
    const k = key('tx');
    expectEq('MULTI SET INCR EXEC', await c.multi().set(k, '10').incr(k).exec(), ['OK', 11]);
    const other = await connected(track);
    expectEq('WATCH', await c.watch(k), 'OK');
    expectEq('SET from another connection', await other.set(k, 'changed'), 'OK');
    let aborted = false;
    try {
      await c.multi().set(k, 'mine').exec();
    } catch (e) {
      if (!(e instanceof WatchError)) throw e;
      aborted = true;
    }
    check('EXEC after a watched key changed throws WatchError', aborted, 'no error');
    expectEq('value after the aborted EXEC', await c.get(k), 'changed');
    await c.del(k);
    return 'multi().exec() → [OK, 11]; WATCH conflict → WatchError';
  },

  async pubsub(track) {
    const pub = await connected(track);
    const sub = track(pub.duplicate());
    sub.on('error', () => {});
    await sub.connect();
    const ch = `${cfg.prefix}:chan`;
    const pat = `${cfg.prefix}:ch*`;
    const got = [];
    let wake;
    const two = new Promise((resolve) => { wake = resolve; });
    await sub.subscribe(ch, (m, c) => { got.push(['message', c, m]); if (got.length >= 2) wake(); });
    await sub.pSubscribe(pat, (m, c) => { got.push(['pmessage', pat, c, m]); if (got.length >= 2) wake(); });
    const receivers = await pub.publish(ch, 'hello');
    // Redis Cluster counts only the receivers on the node that took the PUBLISH.
    if (cfg.topology !== 'cluster') expectEq('PUBLISH receivers', receivers, 2);
    await within(3000, 'message and pmessage', two);
    got.sort((a, b) => a[0].localeCompare(b[0]));
    expectEq('received', got, [['message', ch, 'hello'], ['pmessage', pat, ch, 'hello']]);
    await sub.unsubscribe(ch);
    await sub.pUnsubscribe(pat);
    // node-redis 5.9 (RESP2) keeps decoding replies as Buffers once a client has left
    // subscriber mode (fixed in 6.x); the bytes are Redis's, so compare them as strings.
    const ping = await sub.ping();
    expectEq('PING after unsubscribing', String(ping), 'PONG');
    // Keys on many slots (every node of a cluster) on the connection that left subscriber mode.
    for (let i = 0; i < 10; i++) {
      const k = `${cfg.prefix}:after-sub:${i}`;
      expectEq(`SET ${k} after unsubscribing`, String(await sub.set(k, `x${i}`)), 'OK');
      expectEq(`GET ${k} after unsubscribing`, String(await sub.get(k)), `x${i}`);
      await sub.del(k);
    }
    const note = Buffer.isBuffer(ping) ? ' (replies as Buffers after unsubscribing: node-redis 5.9 RESP2 quirk)' : '';
    return `duplicate() subscriber: message + pmessage, back to commands; PUBLISH counted ${receivers}${note}`;
  },

  async blocking(track) {
    const a = await connected(track);
    const b = await connected(track);
    const k = key('blist');
    await a.del(k);
    const started = Date.now();
    const pop = a.blPop(k, 5);
    await sleep(200);
    expectEq('RPUSH', await b.rPush(k, 'v'), 1);
    expectEq('BLPOP', await pop, { key: k, element: 'v' });
    const waited = Date.now() - started;
    check('BLPOP returned after the push', waited >= 150 && waited < 4000, `${waited} ms`);
    const t0 = Date.now();
    expectEq('BLPOP of an empty list, timeout 0.5', await a.blPop(key('empty'), 0.5), null);
    const t = Date.now() - t0;
    check('BLPOP 0.5 waited about 0.5 s', t >= 400 && t < 3000, `${t} ms`);
    return `BLPOP woke after ${waited} ms; empty → null after ${t} ms`;
  },

  async scripts(track) {
    const c = await connected(track);
    const k = key('script');
    const body = 'return {KEYS[1], ARGV[1]}';
    expectEq('EVAL', await c.eval(body, { keys: [k], arguments: ['arg'] }), [k, 'arg']);
    const sha = await c.scriptLoad(body);
    expectEq('SCRIPT LOAD', sha, crypto.createHash('sha1').update(body).digest('hex'));
    expectEq('EVALSHA', await c.evalSha(sha, { keys: [k], arguments: ['x'] }), [k, 'x']);
    await expectError('EVALSHA of an unknown sha',
      c.evalSha('ffffffffffffffffffffffffffffffffffffffff', { keys: [k], arguments: ['x'] }),
      'NOSCRIPT', isServerError);
    // defineScript: EVALSHA first, EVAL on NOSCRIPT.
    const withScript = track(createClient({
      url: url(),
      scripts: {
        echoKeyArg: redis.defineScript({
          NUMBER_OF_KEYS: 1,
          SCRIPT: 'return {KEYS[1], ARGV[1], "defined"}',
          parseCommand(parser, k1, a1) {
            parser.pushKey(k1);
            parser.push(a1);
          },
          transformReply: (r) => r,
        }),
      },
    }));
    withScript.on('error', () => {});
    await withScript.connect();
    expectEq('defineScript', await withScript.echoKeyArg(k, 'y'), [k, 'y', 'defined']);
    expectEq('defineScript again', await withScript.echoKeyArg(k, 'z'), [k, 'z', 'defined']);
    return 'eval, scriptLoad + evalSha, NOSCRIPT, defineScript';
  },

  async large_value(track) {
    const c = await connected(track);
    const k = key('big');
    const v = bigValue();
    expectEq('SET 8 MiB', await c.set(k, v), 'OK');
    const got = await c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }).get(k);
    check('GET 8 MiB byte-exact', Buffer.isBuffer(got) && got.equals(v), got && got.length);
    await c.del(k);
    const l = key('biglist');
    const items = Array.from({ length: 100000 }, (_x, i) => `item-${i}`);
    expectEq('RPUSH 100000', await c.rPush(l, items), 100000);
    const back = await c.lRange(l, 0, -1);
    expectEq('LRANGE length', back.length, 100000);
    back.forEach((x, i) => { if (x !== items[i]) throw new Error(`LRANGE[${i}] = ${x}`); });
    await c.del(l);
    return '8 MiB binary value, 100000-element list';
  },

  async resp3(track) {
    const c = await connected(track, { RESP: 3 }); // HELLO 3 AUTH user pass
    const h = key('resp3');
    await c.hSet(h, { f1: 'v1', f2: 'v2' });
    // Raw replies (no command transform): a RESP3 map is an object, a RESP2 reply an array.
    const m = await c.sendCommand(['HGETALL', h]);
    expectEq('HGETALL as a RESP3 map', m, { f1: 'v1', f2: 'v2' });
    const asMap = await c.withTypeMapping({ [RESP_TYPES.MAP]: Map }).hGetAll(h);
    check('HGETALL mapped to a Map', asMap instanceof Map && asMap.get('f2') === 'v2', asMap);
    expectEq('GET of a missing key (RESP3 null)', await c.sendCommand(['GET', key('missing')]), null);
    await c.zAdd(key('z'), { score: 1.5, value: 'm' });
    expectEq('ZSCORE as a RESP3 double', await c.sendCommand(['ZSCORE', key('z'), 'm']), 1.5);
    expectEq('HELLO proto', (await c.sendCommand(['HELLO', '3'])).proto, 3);
    await c.del([h, key('z')]);
    return 'RESP: 3 option; map, null and double replies';
  },

  async reconnect(track) {
    const a = await connected(track); // default reconnectStrategy: reconnects
    const b = await connected(track);
    const k = key('reconnect');
    await a.set(k, 'still-here');
    const id = await a.clientId();
    expectEq('CLIENT KILL ID', await b.clientKill({ filter: 'ID', id }), 1);
    await sleep(100);
    // The application's next command: queued while node-redis reconnects (and re-AUTHs).
    expectEq('GET after the kill', await a.get(k), 'still-here');
    const id2 = await a.clientId();
    check('a new connection after the kill', id2 !== id, id2);
    await a.del(k);
    return `reconnectStrategy: killed id ${id}, next command on id ${id2}`;
  },

  async client_list(track) {
    const c = await connected(track);
    const id = await c.clientId();
    check('CLIENT ID is an integer', Number.isInteger(id) && id > 0, id);
    const list = await c.clientList();
    check(`CLIENT LIST has id=${id}`, list.some((e) => e.id === id), list);
    const info = await c.clientInfo();
    expectEq('CLIENT INFO id', info.id, id);
    check('CLIENT INFO addr', /^[0-9.]+:[0-9]+$/.test(info.addr || ''), info.addr);
    expectEq('CLIENT INFO user', info.user, cfg.user);
    expectEq('CLIENT INFO db', info.db, 0);
    expectEq('CLIENT INFO resp', info.resp, 2);
    const name = `${cfg.prefix.replace(/[^A-Za-z0-9:_-]/g, '_')}-list`;
    expectEq('CLIENT SETNAME', await c.clientSetName(name), 'OK');
    expectEq('CLIENT GETNAME', await c.clientGetName(), name);
    const n = await connected(track, { name: `${name}-opt` });
    expectEq('name option', await n.clientGetName(), `${name}-opt`);
    return `id ${id}, addr ${info.addr}`;
  },

  async client_kill(track) {
    const name = `${cfg.prefix.replace(/[^A-Za-z0-9:_-]/g, '_')}-victim`;
    const a = await connected(track, { name, socket: { reconnectStrategy: false } });
    const b = await connected(track);
    await a.ping();
    const victim = (await b.clientList()).find((e) => e.name === name);
    check(`CLIENT LIST has name=${name}`, victim !== undefined, 'not found');
    const aEnded = ended(a, 3000, 'the connection killed by address to close');
    expectEq(`CLIENT KILL ${victim.addr}`, await b.sendCommand(['CLIENT', 'KILL', victim.addr]), 'OK');
    await aEnded;
    const c = await connected(track, { socket: { reconnectStrategy: false } });
    const id = await c.clientId();
    const cEnded = ended(c, 3000, 'the connection killed by id to close');
    expectEq('CLIENT KILL ID', await b.clientKill({ filter: 'ID', id }), 1);
    await cEnded;
    return `killed ${victim.addr} (old form) and id ${id}`;
  },

  async acl(track) {
    const c = await connected(track);
    expectEq('ACL WHOAMI', await c.aclWhoAmI(), cfg.user);
    const users = await c.aclUsers();
    check(`ACL USERS contains ${cfg.user}`, Array.isArray(users) && users.includes(cfg.user), users);
    const cats = await c.aclCat();
    check('ACL CAT contains read', Array.isArray(cats) && cats.includes('read'), cats);
    const wrongUser = `${cfg.prefix}-nosuchuser`;
    await expectError('AUTH as an unknown user', c.auth({ username: wrongUser, password: 'nopass' }),
      'WRONGPASS', isServerError);
    const log = await c.aclLog(50);
    check('ACL LOG is an array', Array.isArray(log) && log.length > 0, log);
    const mine = log.find((e) => e.username === wrongUser);
    check(`ACL LOG has an entry for ${wrongUser}`, mine !== undefined, log.slice(0, 3));
    expectEq('ACL LOG reason', mine.reason, 'auth');
    expectEq('ACL LOG context', mine.context, 'toplevel');
    check('ACL LOG count', Number.isInteger(mine.count) && mine.count >= 1, mine);
    check('ACL LOG age-seconds', typeof mine['age-seconds'] === 'number', mine);
    return `whoami ${cfg.user}; ${users.length} users; ACL LOG reason auth`;
  },

  async cluster_client(track) {
    const cluster = track(createCluster({
      rootNodes: [{ socket: { host: cfg.host, port: cfg.port } }],
      defaults: {
        username: cfg.user,
        password: cfg.password,
        socket: { connectTimeout: 3000, reconnectStrategy: false },
      },
    }), (c) => c.destroy());
    let lastError;
    cluster.on('error', (e) => { lastError = e; });
    try {
      await cluster.connect();
    } catch (e) {
      if (!isServerError(e) && isServerError(lastError)) throw lastError;
      throw e;
    }
    for (let i = 0; i < 10; i++) {
      expectEq(`SET ${cfg.prefix}:cc:${i}`, await cluster.set(`${cfg.prefix}:cc:${i}`, `v${i}`), 'OK');
    }
    for (let i = 0; i < 10; i++) {
      expectEq(`GET ${cfg.prefix}:cc:${i}`, await cluster.get(`${cfg.prefix}:cc:${i}`), `v${i}`);
    }
    for (let i = 0; i < 10; i++) await cluster.del(`${cfg.prefix}:cc:${i}`);
    const { masters } = cluster;
    const view = `${masters.length} master(s): ${masters.map((m) => m.address).join(' ')}`;
    if (masters.length === 1) throw differs(`one-node cluster view (${view})`);
    return `10 keys, ${view}`;
  },
};

console.error(`node-redis ${VERSION}`);
runAll(cfg, features, isServerError, (c) => c.destroy())
  .then(() => process.exit(0))
  .catch((e) => {
    console.error(e);
    process.exit(2);
  });
