'use strict';
// The seed's design in Node, the peer the broker replaces: an Express HTTP API
// that owns one websocket per login (the `ws` package) and answers
// POST /send {session_id, to, body} once the upstream acks. It pairs a login
// with the simulator on first use (the QR scanned over its HTTP control API),
// as the Python peer does. Prints `READY {"url": ...}`, runs until SIGTERM.
//
//   node scripts/bench/node/http_relay.js --upstream-url ws://... --control-url http://...

const crypto = require('node:crypto');
const express = require('express');
const WebSocket = require('ws');

function arg(name) {
  const i = process.argv.indexOf(name);
  if (i < 0 || i + 1 >= process.argv.length) throw new Error(`${name} is required`);
  return process.argv[i + 1];
}

const upstreamUrl = arg('--upstream-url');
const controlUrl = arg('--control-url');

function frames(ws, onFrame) {
  ws.on('message', (raw) => onFrame(JSON.parse(raw.toString())));
}

// Pair `login`: a first connection without credentials, the QR scanned through
// the simulator's control API, the credentials it hands out.
function pair(login) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(upstreamUrl, { perMessageDeflate: false });
    ws.on('error', reject);
    ws.on('open', () => ws.send(JSON.stringify({ type: 'hello', login, credentials: null })));
    frames(ws, (frame) => {
      if (frame.type === 'qr') {
        fetch(`${controlUrl}/control/scan?login=${encodeURIComponent(login)}`).catch(reject);
      } else if (frame.type === 'paired') {
        ws.close();
        resolve(frame.credentials);
      }
    });
    ws.on('close', () => reject(new Error(`${login}: pairing connection closed`)));
  });
}

class Link {
  constructor(login) {
    this.login = login;
    this.waiters = new Map();
    this.ws = null;
  }

  async open() {
    const credentials = await pair(this.login);
    await new Promise((resolve, reject) => {
      const ws = new WebSocket(upstreamUrl, { perMessageDeflate: false, maxPayload: 1 << 20 });
      ws.on('error', reject);
      ws.on('open', () => ws.send(JSON.stringify({ type: 'hello', login: this.login, credentials })));
      frames(ws, (frame) => {
        if (frame.type === 'ready') {
          this.ws = ws;
          resolve();
        } else if (frame.type === 'ack') {
          const waiter = this.waiters.get(frame.id);
          if (waiter) {
            this.waiters.delete(frame.id);
            waiter(Date.now() / 1000);
          }
        }
      });
    });
    // Application pings, as every client of the upstream: it closes idle links.
    let n = 0;
    this.keepalive = setInterval(() => this.ws.send(JSON.stringify({ type: 'ping', id: ++n })), 10000);
  }

  send(to, body) {
    const id = `m-${crypto.randomUUID()}`;
    return new Promise((resolve) => {
      this.waiters.set(id, (ackedAt) => resolve({ id, ackedAt }));
      this.ws.send(JSON.stringify({ type: 'send', id, to, body }));
    });
  }

  close() {
    clearInterval(this.keepalive);
    if (this.ws) this.ws.close();
  }
}

const links = new Map(); // login -> Promise<Link>

function link(login) {
  let opening = links.get(login);
  if (!opening) {
    const l = new Link(login);
    opening = l.open().then(() => l);
    links.set(login, opening);
  }
  return opening;
}

const app = express();
app.use(express.json());
app.post('/send', async (req, res) => {
  try {
    const { session_id: sessionId, to, body } = req.body;
    const l = await link(sessionId);
    const { id, ackedAt } = await l.send(to, body);
    res.json({ message_id: id, status: 'ACKED', acked_at: ackedAt });
  } catch (err) {
    res.status(502).json({ error: String(err) });
  }
});

const server = app.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  process.stdout.write(`READY ${JSON.stringify({ url: `http://127.0.0.1:${port}` })}\n`);
});

async function stop() {
  for (const opening of links.values()) {
    try {
      (await opening).close();
    } catch (_) { /* never opened */ }
  }
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
