import { test } from 'node:test'
import assert from 'node:assert/strict'
import { startBridge, openLink, pairedKv } from './harness.js'

const opened = async (bridge, session, opts = {}) => {
  const kv = opts.kv || await pairedKv(bridge, session)
  const link = openLink(bridge.path, session, { ...opts, kv })
  await link.waitFor(f => f.t === 'open')
  return link
}

test('a hello with the wrong secret is refused and the connection closed', async () => {
  const bridge = await startBridge()
  const link = openLink(bridge.path, 's1', { secret: 'nope' })
  const err = await link.waitFor(f => f.t === 'error')
  assert.match(err.reason, /wrong secret/)
  assert.ok(!JSON.stringify(err).includes('nope'))
  await link.closed
  assert.equal(bridge.net.connects.get('s1'), undefined)
  await bridge.close()
})

test('QR pairing: rotating QR codes, paired, 515, then open on the stored creds', async () => {
  const bridge = await startBridge({ qrIntervalMs: 30 })
  const kv = new Map()
  const link = openLink(bridge.path, 's1', { kv })
  const first = await link.waitFor(f => f.t === 'qr' && f.index === 1)
  const second = await link.waitFor(f => f.t === 'qr' && f.index === 2)
  assert.notEqual(first.code, second.code)
  assert.equal(first.expires_in_ms, 60000)
  assert.equal(second.expires_in_ms, 20000)
  assert.ok(kv.has('creds'), 'fresh creds are stored at once')
  await bridge.net.control({ action: 'scan', session: 's1', phone: '15550001' })
  const paired = await link.waitFor(f => f.t === 'paired')
  assert.equal(paired.me, '15550001:7@s.whatsapp.net')
  const close = await link.waitFor(f => f.t === 'close')
  assert.equal(close.code, 515)
  await link.closed
  assert.match(kv.get('creds'), /15550001:7@s\.whatsapp\.net/)
  assert.ok(kv.has('pre-key:1') && kv.has('pre-key:3'), 'key-store writes went through to the broker')
  const again = openLink(bridge.path, 's1', { kv })
  const open = await again.waitFor(f => f.t === 'open')
  assert.equal(open.me, '15550001:7@s.whatsapp.net')
  assert.ok(!again.frames.some(f => f.t === 'qr'), 'no pairing on stored creds')
  again.conn.end()
  await bridge.close()
})

test('pairing by phone number: the code comes back, entering it pairs', async () => {
  const bridge = await startBridge()
  const kv = new Map()
  const link = openLink(bridge.path, 's2', { kv })
  await link.waitFor(f => f.t === 'qr')
  link.write({ t: 'pair_code', rid: 7, phone: '+1 555 0002' })
  const reply = await link.waitFor(f => f.t === 'reply' && f.rid === 7)
  assert.match(reply.code, /^[0-9A-Z]{8}$/)
  assert.equal(bridge.net.pairingCodes.get('s2').phone, '15550002')
  await bridge.net.control({ action: 'enter_code', session: 's2', code: reply.code })
  await link.waitFor(f => f.t === 'paired')
  assert.equal((await link.waitFor(f => f.t === 'close')).code, 515)
  await bridge.close()
})

test('every disconnect reason reaches the broker with its code and a reason text', async () => {
  const bridge = await startBridge()
  const expected = {
    401: /logged out/, 403: /banned/, 405: /client outdated/, 408: /timed out/, 411: /multi-device/,
    428: /connection closed/, 440: /replaced/, 500: /bad session/, 503: /unavailable/, 515: /restart required/
  }
  const kv = await pairedKv(bridge, 'r')
  for (const [code, text] of Object.entries(expected)) {
    const link = openLink(bridge.path, 'r', { kv })
    await link.waitFor(f => f.t === 'open')
    await bridge.net.control({ action: 'close', session: 'r', code: Number(code), message: 'from the fake' })
    const close = await link.waitFor(f => f.t === 'close')
    assert.equal(close.code, Number(code))
    assert.match(close.reason, text)
    await link.closed
  }
  await bridge.close()
})

test('a reason on connect (405 before open) closes the link with it', async () => {
  const bridge = await startBridge()
  await bridge.net.control({ action: 'fail_connect', session: 'v', code: 405, message: 'Connection Failure' })
  const link = openLink(bridge.path, 'v')
  const close = await link.waitFor(f => f.t === 'close')
  assert.equal(close.code, 405)
  await bridge.close()
})

test('send: sendMessage gets the broker id as messageId, the server ack comes back, once', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'snd')
  link.write({ t: 'send', id: 'm-1', to: '+15550009', body: 'hello' })
  link.write({ t: 'send', id: 'm-1', to: '+15550009', body: 'hello' }) // a resend on the same socket
  link.write({ t: 'send', id: 'm-2', to: '120363000000@g.us', body: 'group' })
  await link.waitFor(f => f.t === 'ack' && f.id === 'm-2')
  const sent = bridge.net.sent.filter(s => s.session === 'snd')
  assert.deepEqual(sent.map(s => [s.id, s.jid, s.text]), [['m-1', '15550009@s.whatsapp.net', 'hello'], ['m-2', '120363000000@g.us', 'group']])
  assert.equal(link.frames.filter(f => f.t === 'ack' && f.id === 'm-1').length, 1)
  await link.waitFor(f => f.t === 'delivered' && f.id === 'm-1')
  assert.ok([...link.kv.keys()].some(k => k.startsWith('session:')), 'signal sessions written through')
  link.conn.end()
  await bridge.close()
})

test('read and played receipts come back once each, in order, after delivered', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'rct')
  link.write({ t: 'send', id: 'm-r', to: '+15550009', body: 'voice' })
  await link.waitFor(f => f.t === 'delivered' && f.id === 'm-r')
  assert.ok((await bridge.net.control({ action: 'receipt', session: 'rct', id: 'm-r', status: 5 })).ok)
  assert.ok((await bridge.net.control({ action: 'receipt', session: 'rct', id: 'm-r', status: 4 })).ok)
  await link.waitFor(f => f.t === 'played' && f.id === 'm-r')
  const receipts = link.frames.filter(f => ['delivered', 'read', 'played'].includes(f.t) && f.id === 'm-r')
  assert.deepEqual(receipts.map(f => f.t), ['delivered', 'read', 'played'])
  link.conn.end()
  await bridge.close()
})

test('an error WhatsApp returns in the ack (463) fails the send with its code', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'err')
  await bridge.net.control({ action: 'fail_send', session: 'err', code: 463 })
  link.write({ t: 'send', id: 'm-9', to: '15550009', body: 'x' })
  const failed = await link.waitFor(f => f.t === 'failed')
  assert.deepEqual([failed.id, failed.code], ['m-9', 463])
  assert.ok(!link.frames.some(f => f.t === 'ack'))
  link.conn.end()
  await bridge.close()
})

test('a send before the socket is open is not handed to sendMessage (the broker resends)', async () => {
  const bridge = await startBridge()
  const link = openLink(bridge.path, 'early')
  await link.waitFor(f => f.t === 'welcome')
  link.write({ t: 'send', id: 'm-early', to: '15550009', body: 'x' })
  await link.waitFor(f => f.t === 'qr')
  assert.equal(bridge.net.sent.length, 0)
  link.conn.end()
  await bridge.close()
})

test('ping is answered only while the WhatsApp socket is open', async () => {
  const bridge = await startBridge()
  const pairing = openLink(bridge.path, 'p')
  await pairing.waitFor(f => f.t === 'qr')
  pairing.write({ t: 'ping', id: 1 })
  await bridge.net.control({ action: 'scan', session: 'p' })
  await pairing.waitFor(f => f.t === 'close')
  assert.ok(!pairing.frames.some(f => f.t === 'pong'))
  const link = openLink(bridge.path, 'p', { kv: pairing.kv })
  await link.waitFor(f => f.t === 'open')
  link.write({ t: 'ping', id: 2 })
  assert.equal((await link.waitFor(f => f.t === 'pong')).id, 2)
  link.conn.end()
  await bridge.close()
})

test('inbound text (notify, not from me) reaches the broker with sender, LID, push name, chat', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'in')
  await bridge.net.control({ action: 'inbound', session: 'in', id: 'W1', from: '15550003@s.whatsapp.net', lid: '777@lid', text: 'hi', push_name: 'Ann' })
  await bridge.net.control({ action: 'inbound', session: 'in', id: 'W2', from: '15550004@s.whatsapp.net', chat: '1203@g.us', text: 'in group' })
  const one = await link.waitFor(f => f.t === 'inbound' && f.id === 'W1')
  assert.deepEqual([one.sender, one.lid, one.push_name, one.chat, one.body], ['15550003@s.whatsapp.net', '777@lid', 'Ann', '777@lid', 'hi'])
  assert.ok(one.ts > 0)
  const two = await link.waitFor(f => f.t === 'inbound' && f.id === 'W2')
  assert.deepEqual([two.sender, two.chat], ['15550004@s.whatsapp.net', '1203@g.us'])
  link.conn.end()
  await bridge.close()
})

test('logout ends the socket as logged out (401)', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'lo')
  link.write({ t: 'logout' })
  assert.equal((await link.waitFor(f => f.t === 'close')).code, 401)
  await bridge.close()
})

test('getMessage (a recipient asks for a retry) is answered from the broker record', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'gm', { sent: new Map([['m-5', 'the body']]) })
  const sock = bridge.net.sockets.get('gm')
  assert.deepEqual(await sock.config.getMessage({ id: 'm-5', remoteJid: 'x@s.whatsapp.net' }), { conversation: 'the body' })
  assert.equal(await sock.config.getMessage({ id: 'm-unknown', remoteJid: 'x@s.whatsapp.net' }), undefined)
  link.conn.end()
  await bridge.close()
})

test('the broker leaving ends the WhatsApp socket', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'gone')
  link.conn.destroy()
  await new Promise(resolve => setTimeout(resolve, 50))
  assert.ok(bridge.net.sockets.get('gone').closed)
  await bridge.close()
})

test('a write the store refuses (fenced) ends the link instead of going on', async () => {
  const bridge = await startBridge()
  const kv = await pairedKv(bridge, 'f')
  const link = openLink(bridge.path, 'f', { kv, refuseWrites: true })
  const close = await link.waitFor(f => f.t === 'close')
  assert.match(close.reason, /store refused/)
  await link.closed
  await bridge.close()
})

test('logs carry no key material even at trace level', async () => {
  const logLines = []
  const bridge = await startBridge({ logLines })
  const link = await opened(bridge, 'secret')
  const creds = bridge.net.sockets.get('secret').authState.creds
  const priv = Buffer.from(creds.noiseKey.private).toString('base64')
  const sock = bridge.net.sockets.get('secret')
  sock.config.logger.info({ creds }, 'something with creds attached')
  assert.ok(logLines.length > 0)
  assert.ok(!logLines.join('').includes(priv))
  link.conn.end()
  await bridge.close()
})
