'use strict';
// Unit tests against an in-process fake broker (same proto, loopback only):
// retries keep one idempotency key, rich error details decode, and a dropped
// status stream resumes after the last event id.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');

const { BrokerClient, BrokerError, loadBrokerPackage } = require('..');

const rpc = new protobuf.Root().loadSync(path.join(__dirname, '..', 'lib', 'rpc_status.proto'),
  { keepCase: true });

function richError(code, reason, message) {
  const info = rpc.lookupType('google.rpc.ErrorInfo');
  const status = rpc.lookupType('google.rpc.Status');
  const detail = {
    type_url: 'type.googleapis.com/google.rpc.ErrorInfo',
    value: info.encode({ reason, domain: 'broker.v1', metadata: { session_id: 's1' } }).finish(),
  };
  const metadata = new grpc.Metadata();
  metadata.set('grpc-status-details-bin',
    Buffer.from(status.encode({ code, message, details: [detail] }).finish()));
  return { code, details: message, metadata };
}

const calls = { send: [], status: [], pairing: [], batch: [] };
const script = { send: [], status: [], pairing: [], batch: [] };
let server;
let target;

before(async () => {
  const pkg = loadBrokerPackage();
  server = new grpc.Server();
  server.addService(pkg.Broker.service, {
    Send(call, callback) {
      calls.send.push(call.request);
      const next = script.send.shift();
      if (next) return callback(next);
      callback(null, { messageId: 'm-1', status: 'ACKED', sequence: 1 });
    },
    // Each scripted step: {error} ends the call; else per ref the SendError to fail it
    // with (absent: it succeeds). No step left: an older release without SendBatch.
    SendBatch(call, callback) {
      const step = script.batch.shift();
      if (!step) {
        calls.batchRefused = (calls.batchRefused || 0) + 1;
        return callback({ code: grpc.status.UNIMPLEMENTED, details: 'no SendBatch' });
      }
      calls.batch.push(call.request);
      if (step.error) return callback(step.error);
      callback(null, {
        results: call.request.items.map((item) => (step[item.ref]
          ? { ref: item.ref, error: step[item.ref] }
          : { ref: item.ref, response: { messageId: `msg-${item.request.idempotencyKey}`, status: 'ACKED' } })),
      });
    },
    RequestPairingCode(call, callback) {
      calls.pairing.push(call.request);
      const next = script.pairing.shift();
      if (next) return callback(next);
      callback(null, { sessionId: call.request.sessionId, code: 'ABCD1234' });
    },
    DownloadMedia(call) {
      calls.media = (calls.media || 0) + 1;
      if (calls.media === 1) {
        call.emit('error', richError(grpc.status.UNAVAILABLE, 'STORE_UNAVAILABLE', 'store down'));
        return;
      }
      if (call.request.messageId === 'gone') {
        call.emit('error', richError(grpc.status.NOT_FOUND, 'MEDIA_NOT_FOUND', 'not kept'));
        return;
      }
      for (const part of ['abc', 'def', 'g']) {
        call.write({ data: Buffer.from(part), offset: 0, size: 7, mimeType: 'image/png' });
      }
      call.end();
    },
    StreamStatus(call) {
      calls.status.push(call.request);
      const step = script.status.shift() || { events: [] };
      for (const ev of step.events) call.write(ev);
      if (step.error) call.emit('error', step.error);
      // else: stay open, like a live stream
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
      (err, p) => (err ? reject(err) : resolve(p)));
  });
  target = `127.0.0.1:${port}`;
});

after(() => server.forceShutdown());

test('send retries UNAVAILABLE with the same idempotency key', async () => {
  calls.send.length = 0;
  script.send = [
    richError(grpc.status.UNAVAILABLE, 'NOT_DELIVERED_YET', 'still reconnecting'),
    richError(grpc.status.UNAVAILABLE, 'NOT_DELIVERED_YET', 'still reconnecting'),
  ];
  const client = new BrokerClient(target, { timeoutMs: 10000 });
  try {
    const result = await client.send('s1', '+15550100', 'hi', { idempotencyKey: 'k-1' });
    assert.equal(result.acked, true);
    assert.equal(result.messageId, 'm-1');
    assert.deepEqual(calls.send.map((r) => r.idempotencyKey), ['k-1', 'k-1', 'k-1']);
  } finally {
    client.close();
  }
});

test('a generated key is reused across retries too', async () => {
  calls.send.length = 0;
  script.send = [richError(grpc.status.UNAVAILABLE, 'STORE_UNAVAILABLE', 'redis down')];
  const client = new BrokerClient(target);
  try {
    const result = await client.send('s1', 'to', 'body');
    const keys = calls.send.map((r) => r.idempotencyKey);
    assert.equal(keys.length, 2);
    assert.ok(keys[0].length > 0);
    assert.equal(keys[0], keys[1]);
    assert.equal(result.idempotencyKey, keys[0]);
  } finally {
    client.close();
  }
});

test('other codes are not retried and carry the machine-readable reason', async () => {
  calls.send.length = 0;
  script.send = [richError(grpc.status.FAILED_PRECONDITION, 'LOGGED_OUT', 'logged out')];
  const client = new BrokerClient(target);
  try {
    await assert.rejects(client.send('s1', 'to', 'body'), (err) => {
      assert.ok(err instanceof BrokerError);
      assert.equal(err.codeName, 'FAILED_PRECONDITION');
      assert.equal(err.reason, 'LOGGED_OUT');
      assert.equal(err.metadata.session_id, 's1');
      assert.equal(err.retryable, false);
      return true;
    });
    assert.equal(calls.send.length, 1);
  } finally {
    client.close();
  }
});

test('requestPairingCode returns the code and is not retried', async () => {
  const client = new BrokerClient(target);
  try {
    assert.equal(await client.requestPairingCode('s1', '+4915123456789'), 'ABCD1234');
    assert.deepEqual(calls.pairing.map((r) => [r.sessionId, r.phoneNumber]),
      [['s1', '+4915123456789']]);
    script.pairing = [richError(grpc.status.UNAVAILABLE, 'NOT_OWNER', 'moved')];
    await assert.rejects(client.requestPairingCode('s1', '+4915123456789'),
      (err) => err instanceof BrokerError && err.reason === 'NOT_OWNER');
    assert.equal(calls.pairing.length, 2);
  } finally {
    client.close();
  }
});

test('watchStatus resumes after the last event id when the stream drops', async () => {
  calls.status.length = 0;
  const ev = (id, state) => ({ eventId: id, sessionId: 's1', sequence: Number(id), state });
  script.status = [
    { events: [ev('1', 'OPEN'), ev('2', 'RECONNECTING')],
      error: { code: grpc.status.UNAVAILABLE, details: 'broker restarting' } },
    { events: [ev('3', 'OPEN')] },
  ];
  const client = new BrokerClient(target);
  try {
    const watch = client.watchStatus({ sessionIds: ['s1'] });
    const seen = [];
    for await (const event of watch) {
      seen.push(`${event.eventId}:${event.state}`);
      if (seen.length === 3) break;
    }
    assert.deepEqual(seen, ['1:OPEN', '2:RECONNECTING', '3:OPEN']);
    assert.deepEqual(calls.status.map((r) => r.resumeAfter), ['', '2']);
    assert.equal(watch.reconnects, 1);
    assert.equal(watch.lastEventId, '3');
  } finally {
    client.close();
  }
});

test('downloadMedia joins the chunks, retries UNAVAILABLE, types the rest', async () => {
  const client = new BrokerClient(target, { timeoutMs: 5000 });
  try {
    const data = await client.downloadMedia('s1', 'up-1');
    assert.equal(data.toString(), 'abcdefg');
    assert.equal(calls.media, 2); // the first attempt failed UNAVAILABLE
    await assert.rejects(client.downloadMedia('s1', 'gone'),
      (err) => err instanceof BrokerError && err.reason === 'MEDIA_NOT_FOUND');
  } finally {
    client.close();
  }
});

// sendMany() without coalescing: SendBatch calls, in list order.

const LATE = { code: grpc.status.UNAVAILABLE, reason: 'NOT_DELIVERED_YET', message: 'queued' };
const refs = () => calls.batch.map((r) => r.items.map((item) => Number(item.ref)));

test('sendMany without coalescing resends only retryable items, with their keys', async () => {
  calls.batch = [];
  script.batch = [{ 1: LATE, 3: LATE }, {}];
  const client = new BrokerClient(target, { coalesce: false, timeoutMs: 20000 });
  try {
    const sent = calls.send.length;
    const out = await client.sendMany([0, 1, 2, 3].map((n) => ({
      sessionId: `s${n % 2}`, to: 'alice', body: `m${n}`, idempotencyKey: `k${n}`,
    })));
    assert.deepEqual(refs(), [[0, 1, 2, 3], [1, 3]]);
    assert.deepEqual(out.map((r) => r.messageId), ['msg-k0', 'msg-k1', 'msg-k2', 'msg-k3']);
    assert.deepEqual(calls.batch[1].items.map((i) => i.request.idempotencyKey), ['k1', 'k3']);
    assert.equal(calls.send.length, sent);
  } finally {
    client.close();
  }
});

test('sendMany stops at a retryable item so later ones never overtake it', async () => {
  calls.batch = [];
  script.batch = [{ 0: LATE }, {}, {}];
  const client = new BrokerClient(target, { coalesce: false, timeoutMs: 20000 });
  try {
    const big = 'x'.repeat(400000);
    const out = await client.sendMany([0, 1, 2, 3, 4].map((n) => ({
      sessionId: 's1', to: 'alice', body: big, idempotencyKey: `k${n}`,
    })));
    assert.ok(out.every((r) => !(r instanceof BrokerError)));
    assert.deepEqual(refs(), [[0, 1], [0, 2], [3, 4]]); // two fit in 1 MiB
  } finally {
    client.close();
  }
});

test('sendMany returns each item\'s last error when retrying stops', async () => {
  calls.batch = [];
  const down = richError(grpc.status.UNAVAILABLE, 'STORE_UNAVAILABLE', 'store down');
  script.batch = [{ 1: LATE }, { error: down }];
  const client = new BrokerClient(target, { coalesce: false, timeoutMs: 20000, retryAttempts: 2 });
  try {
    const out = await client.sendMany([0, 1].map((n) => ({
      sessionId: 's1', to: 'alice', body: `m${n}`, idempotencyKey: `k${n}`,
    })));
    assert.deepEqual(refs(), [[0, 1], [1]]);
    assert.equal(out[0].messageId, 'msg-k0');
    assert.equal(out[1].reason, 'NOT_DELIVERED_YET');
    script.batch = [{ error: down }, { error: down }];
    const [never] = await client.sendMany([{ sessionId: 's1', to: 'alice', body: 'm2' }]);
    assert.equal(never.reason, 'STORE_UNAVAILABLE');
  } finally {
    client.close();
  }
});

test('sendMany on a broker without SendBatch sends each with Send', async () => {
  calls.batch = [];
  script.batch = [];
  const client = new BrokerClient(target, { coalesce: false, timeoutMs: 20000 });
  try {
    const sent = calls.send.length;
    const out = await client.sendMany([0, 1, 2].map((n) => ({
      sessionId: 's1', to: 'alice', body: `m${n}`, idempotencyKey: `k${n}`,
    })));
    const again = await client.sendMany([{ sessionId: 's1', to: 'alice', body: 'm3', idempotencyKey: 'k3' }]);
    assert.ok(out.concat(again).every((r) => r.messageId === 'm-1'));
    assert.deepEqual(calls.send.slice(sent).map((r) => r.idempotencyKey).sort(), ['k0', 'k1', 'k2', 'k3']);
    assert.equal(calls.batchRefused, 1); // asked once, then remembered
  } finally {
    client.close();
  }
});
