'use strict';
// Shared by tests/clients/ioredis/compat.js and tests/clients/node-redis/compat.js: the
// client-program contract of tests/clients/README.md (environment, RESULT lines, one timeout
// per feature, key names).

const path = require('path');
const { createRequire } = require('module');

/// `require` resolving from this npm project (tests/clients/node/node_modules).
const nodeRequire = createRequire(path.join(__dirname, 'package.json'));

const FEATURES = [
  'auth', 'select', 'pipeline', 'transaction', 'pubsub', 'blocking', 'scripts',
  'large_value', 'resp3', 'reconnect', 'client_list', 'client_kill', 'acl', 'cluster_client',
];
const FEATURE_TIMEOUT_MS = 10000;
/// The whole program stays under the contract's 60 s even if every feature hangs.
const PROGRAM_BUDGET_MS = 55000;

function env(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === '') {
    if (fallback !== undefined) return fallback;
    throw new Error(`environment variable ${name} is not set (see tests/clients/README.md)`);
  }
  return v;
}

function config() {
  const c = {
    host: env('DM_HOST'),
    port: Number(env('DM_PORT')),
    user: env('DM_USER'),
    password: env('DM_PASSWORD'),
    topology: env('DM_TOPOLOGY', 'standalone'),
    mode: env('DM_MODE', 'direct'),
    prefix: env('DM_PREFIX', `compat:${process.pid}`),
  };
  const only = (process.env.DM_FEATURES || '').split(/\s+/).filter(Boolean);
  for (const f of only) {
    if (!FEATURES.includes(f)) throw new Error(`DM_FEATURES names an unknown feature ${f}`);
  }
  c.features = only.length ? FEATURES.filter((f) => only.includes(f)) : FEATURES;
  // Multi-key commands need one slot in cluster topology: hash tag on the prefix.
  c.key = (name) => (c.topology === 'cluster' ? `{${c.prefix}}:${name}` : `${c.prefix}:${name}`);
  return c;
}

/// The feature's outcome other than `works`.
class Outcome extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}
const na = (detail) => new Outcome('na', detail);
const differs = (detail) => new Outcome('differs', detail);

function oneLine(s) {
  return String(s).replace(/\s+/g, ' ').trim();
}

function show(v) {
  if (Buffer.isBuffer(v)) return `<${v.length} bytes>`;
  let s;
  try {
    s = JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? `${x}n` : x));
  } catch (e) {
    s = String(v);
  }
  if (s === undefined) s = String(v);
  return s.length > 200 ? `${s.slice(0, 200)}...` : s;
}

/// Throws FAILED-worthy errors when `got` is not `want` (deep, for JSON-able values).
function expectEq(what, got, want) {
  if (show(got) !== show(want) || (Buffer.isBuffer(want) && !want.equals(got))) {
    throw new Error(`${what}: got ${show(got)}, expected ${show(want)}`);
  }
}

function check(what, ok, got) {
  if (!ok) throw new Error(`${what}: got ${show(got)}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Resolves with `promise`, or rejects after `ms` naming `what`.
function within(ms, what, promise) {
  let timer;
  const t = new Promise((_r, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

/// Expects `promise` to reject with a server error whose text contains `needle`.
async function expectError(what, promise, needle, isServerError) {
  let v;
  try {
    v = await promise;
  } catch (e) {
    if (isServerError(e) && String(e.message).includes(needle)) return String(e.message);
    throw new Error(`${what}: expected a ${needle} error, got ${e && e.constructor && e.constructor.name}: ${e && e.message}`);
  }
  throw new Error(`${what}: expected a ${needle} error, got the reply ${show(v)}`);
}

/// 8 MiB holding every byte value.
function bigValue() {
  const b = Buffer.alloc(8 * 1024 * 1024);
  for (let i = 0; i < b.length; i++) b[i] = (i * 7 + (i >> 16)) & 0xff;
  return b;
}

/// Runs every selected feature with its own timeout and resources, printing one RESULT line each.
/// `isServerError(e)` tells error replies (→ refused) from anything else (→ FAILED); every client
/// a feature opens goes through `track(client[, close])` and is closed after it (also after a
/// timeout) with `close` or `defaultClose`.
async function runAll(cfg, features, isServerError, defaultClose) {
  // A feature that timed out may leave promises that reject once its clients are closed: log
  // them, they must not end the program (Node's default for an unhandled rejection).
  process.on('unhandledRejection', (e) => {
    console.error('late rejection of a finished feature (ignored):', e && e.message ? e.message : e);
  });
  const programStart = Date.now();
  for (const name of cfg.features) {
    const left = PROGRAM_BUDGET_MS - (Date.now() - programStart);
    if (left < 1000) {
      process.stdout.write(`RESULT ${name} FAILED not run: earlier features spent the program's ${PROGRAM_BUDGET_MS / 1000} s\n`);
      continue;
    }
    const res = []; // closers of the clients the feature opened
    const track = (c, close = defaultClose) => {
      res.push(() => close(c));
      return c;
    };
    let status = 'works';
    let detail = '';
    const started = Date.now();
    try {
      const d = await within(Math.min(FEATURE_TIMEOUT_MS, left), name, features[name](track));
      detail = d || '';
    } catch (e) {
      if (e instanceof Outcome) {
        status = e.status;
        detail = e.message;
      } else if (isServerError(e)) {
        status = 'refused';
        detail = e.message;
      } else {
        status = 'FAILED';
        detail = `${e && e.constructor ? e.constructor.name : 'error'}: ${e && e.message}`;
        console.error(`[${name}]`, e && e.stack ? e.stack : e);
      }
    }
    for (const close of res) {
      try {
        await Promise.resolve(close()).catch(() => {});
      } catch (e) {
        /* already closed */
      }
    }
    console.error(`[${name}] ${status} in ${Date.now() - started} ms`);
    process.stdout.write(`RESULT ${name} ${status} ${oneLine(detail)}\n`);
  }
}

module.exports = {
  nodeRequire, FEATURES, config, Outcome, na, differs, show, expectEq, check, sleep, within,
  expectError, bigValue, runAll,
};
