#!/usr/bin/env node
'use strict';
/**
 * Many messages at once: `--count` concurrent send() calls (the client carries
 * them on one SendStream call), then the same again with sendMany(). One JSON
 * line per message on stdout, then a summary line.
 *
 *   node examples/bulk.js --session 962302 --to +15550100 --count 100 [--prefix bulk]
 *       [--target 127.0.0.1:50051] [--no-coalesce]
 */

const { parseArgs } = require('node:util');
const { BrokerClient, BrokerError } = require('..');

async function main() {
  const { values: args } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.BROKER_TARGET || '127.0.0.1:50051' },
      session: { type: 'string' },
      to: { type: 'string' },
      count: { type: 'string', default: '10' },
      prefix: { type: 'string', default: 'bulk' },
      'no-coalesce': { type: 'boolean', default: false },
    },
  });
  const print = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
  const client = new BrokerClient(args.target, { coalesce: !args['no-coalesce'] });
  const n = Number(args.count);
  try {
    const sent = await Promise.all(Array.from({ length: n }, (_, i) => client.send(
      args.session, args.to, `${args.prefix} ${i}`, { idempotencyKey: `${args.prefix}-${i}` })));
    for (const r of sent) print({ type: 'sent', messageId: r.messageId, acked: r.acked });
    const many = await client.sendMany(Array.from({ length: n }, (_, i) => ({
      sessionId: i === 0 ? 'no-such-session' : args.session, to: args.to,
      body: `${args.prefix} many ${i}`, idempotencyKey: `${args.prefix}-many-${i}`,
    })));
    for (const r of many) {
      print(r instanceof BrokerError
        ? { type: 'error', code: r.codeName, reason: r.reason }
        : { type: 'sent', messageId: r.messageId, acked: r.acked });
    }
    print({ type: 'summary', streamsOpened: client._sendStream.opened, coalesce: client.coalesce });
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ type: 'error', message: String(err) }) + '\n');
  process.exitCode = 1;
});
