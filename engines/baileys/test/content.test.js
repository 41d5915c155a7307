import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { startBridge, openLink, pairedKv } from './harness.js'
import { toMessage } from '../src/session.js'

const sha = buf => createHash('sha256').update(buf).digest('hex')
const ID = n => 'm-' + String(n).padStart(32, '0')

const opened = async (bridge, session, kv) => {
  const link = openLink(bridge.path, session, { kv: kv || await pairedKv(bridge, session) })
  await link.waitFor(f => f.t === 'open')
  return link
}

const media = (kind, data, extra = {}) => ({ media: { kind, data: data.toString('base64'), mime_type: extra.mime || 'application/octet-stream', caption: extra.caption || '', file_name: extra.file || '' } })

test('every content kind maps to the AnyMessageContent Baileys expects', () => {
  const img = Buffer.from([1, 2, 3])
  const cases = [
    [{ body: 'hi' }, { text: 'hi' }],
    [{ content: media('image', img, { mime: 'image/jpeg', caption: 'cap' }) }, { image: img, mimetype: 'image/jpeg', caption: 'cap' }],
    [{ content: media('video', img, { mime: 'video/mp4' }) }, { video: img, mimetype: 'video/mp4' }],
    [{ content: media('audio', img, { mime: 'audio/mpeg' }) }, { audio: img, mimetype: 'audio/mpeg', ptt: false }],
    [{ content: media('voice_note', img, { mime: 'audio/ogg; codecs=opus' }) }, { audio: img, mimetype: 'audio/ogg; codecs=opus', ptt: true }],
    [{ content: media('document', img, { mime: 'application/pdf', file: 'a.pdf', caption: 'c' }) }, { document: img, mimetype: 'application/pdf', fileName: 'a.pdf', caption: 'c' }],
    [{ content: media('sticker', img, { mime: 'image/webp', caption: 'ignored' }) }, { sticker: img, mimetype: 'image/webp' }],
    [{ content: { location: { latitude: 52.5, longitude: 13.4, name: 'Berlin', address: '' } } }, { location: { degreesLatitude: 52.5, degreesLongitude: 13.4, name: 'Berlin' } }],
    [{ content: { reaction: { message_id: 'ABC', emoji: '👍', from_me: false } } }, { react: { text: '👍', key: { remoteJid: '4915123456789@s.whatsapp.net', id: 'ABC', fromMe: false } } }],
    [{ content: { reaction: { message_id: ID(1), emoji: '' } } }, { react: { text: '', key: { remoteJid: '4915123456789@s.whatsapp.net', id: ID(1), fromMe: true } } }],
    [{ body: 'hey @x', content: { mentions: ['+4915000000001', '123@s.whatsapp.net'] } }, { text: 'hey @x', mentions: ['4915000000001@s.whatsapp.net', '123@s.whatsapp.net'] }]
  ]
  for (const [frame, want] of cases) {
    const { jid, message, options } = toMessage({ id: 'x', to: '+4915123456789', body: '', ...frame })
    assert.equal(jid, '4915123456789@s.whatsapp.net')
    assert.deepEqual(message, want)
    assert.deepEqual(options, { messageId: 'x' })
  }
  const { options } = toMessage({ id: 'y', to: '+4915123456789', body: 'reply', content: { reply_to: 'Q1' } })
  assert.deepEqual(options, { messageId: 'y', quoted: { key: { remoteJid: '4915123456789@s.whatsapp.net', id: 'Q1', fromMe: false }, message: { conversation: '' } } })
})

test('content reaches sendMessage exactly as sent, once per id, in order; presence reaches sendPresenceUpdate', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'c1')
  const big = Buffer.alloc(3 * 1024 * 1024, 7) // a line far larger than one socket chunk
  const frames = [
    { t: 'send', id: ID(1), to: '+4915123456789', body: '', content: media('image', big, { mime: 'image/png', caption: 'big' }) },
    { t: 'send', id: ID(2), to: '+4915123456789', body: '', content: { location: { latitude: -33.9, longitude: 18.4, name: '', address: '' } } },
    { t: 'send', id: ID(3), to: '+4915123456789', body: 'quoting', content: { reply_to: ID(1), mentions: ['+4915000000001'] } },
    { t: 'send', id: ID(4), to: '+4915123456789', body: '', content: { reaction: { message_id: ID(1), emoji: '🎉' } } }
  ]
  for (const f of frames) link.write(f)
  link.write(frames[0]) // a resend of an id already handed to this socket
  link.write({ t: 'presence', to: '+4915123456789', presence: 'composing' })
  link.write({ t: 'presence', to: '+4915123456789', presence: 'bogus' })
  for (let n = 1; n <= 4; n++) await link.waitFor(f => f.t === 'ack' && f.id === ID(n))
  const sent = bridge.net.sent.filter(s => s.session === 'c1')
  assert.deepEqual(sent.map(s => s.id), [ID(1), ID(2), ID(3), ID(4)])
  assert.equal(sent[0].content.image.sha256, sha(big))
  assert.equal(sent[0].content.image.bytes, big.length)
  assert.equal(sent[0].content.caption, 'big')
  assert.deepEqual(sent[1].content, { location: { degreesLatitude: -33.9, degreesLongitude: 18.4 } })
  assert.deepEqual(sent[2].content, { text: 'quoting', mentions: ['4915000000001@s.whatsapp.net'] })
  assert.equal(sent[2].quoted.key.id, ID(1))
  assert.equal(sent[2].quoted.key.fromMe, true)
  assert.deepEqual(sent[3].content.react.key.id, ID(1))
  const presence = bridge.net.presence.filter(p => p.session === 'c1')
  assert.deepEqual(presence.map(p => [p.type, p.jid]), [['composing', '4915123456789@s.whatsapp.net']])
  link.conn.end()
  await bridge.close()
})

test('a socket that drops mid-upload sends nothing; the resend on the next link goes out once', async () => {
  const bridge = await startBridge()
  const kv = await pairedKv(bridge, 'c2')
  await bridge.net.control({ action: 'drop_media', session: 'c2', times: 1 })
  const data = Buffer.alloc(1024 * 1024, 3)
  const frame = { t: 'send', id: ID(9), to: '+4915123456789', body: '', content: media('document', data, { mime: 'application/pdf', file: 'r.pdf' }) }
  const first = await opened(bridge, 'c2', kv)
  first.write(frame)
  assert.equal((await first.waitFor(f => f.t === 'close')).code, 408)
  assert.ok(!first.frames.some(f => f.t === 'ack' || f.t === 'failed'))
  await first.closed
  const second = await opened(bridge, 'c2', kv)
  second.write(frame)
  await second.waitFor(f => f.t === 'ack' && f.id === ID(9))
  const sent = bridge.net.sent.filter(s => s.session === 'c2')
  assert.equal(sent.length, 1)
  assert.equal(sent[0].content.document.sha256, sha(data))
  assert.equal(sent[0].content.fileName, 'r.pdf')
  second.conn.end()
  await bridge.close()
})

test('hostile content fails the message, never the bridge', async () => {
  const bridge = await startBridge()
  const link = await opened(bridge, 'c3')
  const bad = [
    { media: { kind: 'hologram', data: 'AAAA', mime_type: 'x/y' } },
    { media: null, location: { latitude: 'north' } },
    { reaction: { message_id: null } },
    'just a string',
    { mentions: 'not a list' }
  ]
  bad.forEach((content, n) => link.write({ t: 'send', id: ID(100 + n), to: '+4915123456789', body: 'b', content }))
  link.write({ t: 'send', id: ID(200), to: '+4915123456789', body: 'still fine' })
  await link.waitFor(f => f.t === 'ack' && f.id === ID(200))
  await link.waitFor(f => f.t === 'failed' && f.id === ID(100))
  link.conn.end()
  await bridge.close()
})
