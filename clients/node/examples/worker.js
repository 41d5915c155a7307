#!/usr/bin/env node
'use strict';
/**
 * A minimal worker: send one message through the broker, then print the
 * session's live status events. Every line on stdout is one JSON object, so
 * scripts (and the interop test) can read it.
 *
 *   node examples/worker.js --session 962302 --to +15550100 --body "your order shipped" \
 *       --key order-1234-shipped [--target 127.0.0.1:50051] [--events 1] [--timeout-ms 30000]
 *       [--token brk_...]   (or BROKER_TARGET / BROKER_TOKEN)
 *
 * --events N: stop after N status events (0: watch forever); the first one
 * is the session's snapshot. Exit code 1 with `{"type":"error",...}` on failure.
 */

const { parseArgs } = require('node:util');
const { BrokerClient, BrokerError } = require('..');

async function main() {
  const { values: args } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.BROKER_TARGET || '127.0.0.1:50051' },
      session: { type: 'string' },
      to: { type: 'string' },
      body: { type: 'string' },
      key: { type: 'string' },
      events: { type: 'string', default: '1' },
      'timeout-ms': { type: 'string', default: '30000' },
      token: { type: 'string', default: process.env.BROKER_TOKEN },
    },
  });
  for (const name of ['session', 'to', 'body']) {
    if (!args[name]) throw new Error(`--${name} is required`);
  }
  const print = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
  const client = new BrokerClient(args.target, {
    timeoutMs: Number(args['timeout-ms']),
    token: args.token || null, // a worker token may Send; watching needs a viewer role too
  });
  try {
    const result = await client.send(args.session, args.to, args.body, {
      idempotencyKey: args.key, // undefined: the client makes one up and reuses it on retries
    });
    print({ type: 'sent', ...result });

    const wanted = Number(args.events);
    let seen = 0;
    for await (const event of client.watchStatus({ sessionIds: [args.session] })) {
      const { qr, ...rest } = event; // the QR payload is a secret-in-waiting: not in logs
      print({ type: 'status', ...rest, hasQr: Boolean(qr) });
      if (wanted > 0 && ++seen >= wanted) break;
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const fields = err instanceof BrokerError
    ? { code: err.codeName, reason: err.reason, message: err.message }
    : { message: String(err && err.message ? err.message : err) };
  process.stdout.write(JSON.stringify({ type: 'error', ...fields }) + '\n');
  process.exitCode = 1;
});
