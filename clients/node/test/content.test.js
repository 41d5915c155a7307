'use strict';
// The typed content helpers against an in-process fake broker: what reaches
// the broker is exactly the Content each helper promises, media bytes intact.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');

const { BrokerClient, loadBrokerPackage } = require('..');

const sends = [];
const presences = [];
let server;
let client;

before(async () => {
  const pkg = loadBrokerPackage();
  server = new grpc.Server({ 'grpc.max_receive_message_length': 64 * 1024 * 1024 });
  server.addService(pkg.Broker.service, {
    Send(call, callback) {
      sends.push(call.request);
      callback(null, { messageId: `m-${sends.length}`, status: 'ACKED', sequence: sends.length });
    },
    SendPresence(call, callback) {
      presences.push(call.request);
      callback(null, {});
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(),
      (err, p) => (err ? reject(err) : resolve(p)));
  });
  client = new BrokerClient(`127.0.0.1:${port}`, { coalesce: false, retryAttempts: 1 });
});

after(() => {
  client.close();
  server.forceShutdown();
});

test('each helper sends its content kind, media bytes as given', async () => {
  const big = Buffer.alloc(6 * 1024 * 1024, 9); // past gRPC's default 4 MiB limit
  await client.sendImage('s', '+4915123456789', big, 'image/png', { caption: 'c', replyTo: 'Q', mentions: ['+4915000000001'] });
  await client.sendVideo('s', '+4915123456789', Buffer.from([1]), undefined, { caption: 'v' });
  await client.sendAudio('s', '+4915123456789', Buffer.from([2]), undefined, { voice: true });
  await client.sendDocument('s', '+4915123456789', Buffer.from([3]), 'application/pdf', 'a.pdf');
  await client.sendSticker('s', '+4915123456789', Buffer.from([4]).toString('base64'));
  await client.sendLocation('s', '+4915123456789', 52.5, 13.4, { name: 'B' });
  await client.sendReaction('s', '+4915123456789', 'm-abc', '👍', { fromMe: true });
  await client.sendText('s', '+4915123456789', 'hi', { replyTo: 'Q2' });
  await client.send('s', '+4915123456789', 'plain');
  await client.sendPresence('s', '+4915123456789', 'composing');
  const [img, vid, aud, doc, stk, loc, react, text, plain] = sends;
  assert.equal(img.content.kind, 'media');
  assert.equal(img.content.media.kind, 'IMAGE');
  assert.ok(Buffer.from(img.content.media.data).equals(big));
  assert.equal(img.content.media.caption, 'c');
  assert.equal(img.content.replyTo, 'Q');
  assert.deepEqual(img.content.mentions, ['+4915000000001']);
  assert.equal(img.body, '');
  assert.equal(vid.content.media.kind, 'VIDEO');
  assert.equal(vid.content.media.mimeType, 'video/mp4');
  assert.equal(aud.content.media.kind, 'VOICE_NOTE');
  assert.equal(doc.content.media.fileName, 'a.pdf');
  assert.equal(stk.content.media.kind, 'STICKER');
  assert.deepEqual([...stk.content.media.data], [4]);
  assert.equal(loc.content.location.latitude, 52.5);
  assert.equal(loc.content.location.name, 'B');
  assert.deepEqual([react.content.reaction.messageId, react.content.reaction.emoji, react.content.reaction.fromMe], ['m-abc', '👍', true]);
  assert.equal(text.content.text, 'hi');
  assert.equal(text.content.replyTo, 'Q2');
  assert.equal(plain.content, null);
  assert.equal(plain.body, 'plain');
  assert.deepEqual([presences[0].chat, presences[0].presence], ['+4915123456789', 'COMPOSING']);
  await assert.rejects(client.sendPresence('s', 'x', 'dancing'), TypeError);
});
