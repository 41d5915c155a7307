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

test('inbound of every kind: media downloaded with Baileys\' helper byte-exact, quotes, reactions, locations, in order', async () => {
  const bridge = await startBridge({ options: { maxMediaBytes: 2 * 1024 * 1024 } })
  const links = {}
  const sessions = ['in1', 'in2', 'in3']
  try {
    await inboundOfEveryKind(bridge, links, sessions)
  } finally {
    for (const s of sessions) links[s]?.write({ t: 'close' })
    await bridge.close()
  }
})

async function inboundOfEveryKind (bridge, links, sessions) {
  for (const s of sessions) links[s] = await opened(bridge, s)
  const peer = '4915123456789@s.whatsapp.net'
  const bytes = (s, n) => createHash('sha512').update(`${s}:${n}`).digest().toString('base64').repeat(n)
  const frames = s => [
    { id: `${s}-img`, content: media('image', Buffer.from(bytes(s, 9000)), { mime: 'image/jpeg', caption: `photo ${s}` }) },
    { id: `${s}-doc`, content: media('document', Buffer.from(bytes(s, 30)), { mime: 'application/pdf', file: `${s}.pdf` }) },
    { id: `${s}-ptt`, content: media('voice_note', Buffer.from(bytes(s, 20)), { mime: 'audio/ogg; codecs=opus' }) },
    { id: `${s}-stk`, content: media('sticker', Buffer.from(bytes(s, 10)), { mime: 'image/webp' }) },
    { id: `${s}-vid`, content: { media: { ...media('video', Buffer.from('v')).media, mime_type: 'video/mp4', size: 3 * 1024 * 1024 } } },
    { id: `${s}-gone`, content: { media: { ...media('image', Buffer.from('x')).media, mime_type: 'image/png', missing: true } } },
    { id: `${s}-old`, content: { media: { ...media('audio', Buffer.from(bytes(s, 5))).media, mime_type: 'audio/mpeg', expired: true } } },
    { id: `${s}-loc`, content: { location: { latitude: 52.52, longitude: 13.405, name: 'Alex', address: 'Berlin' } } },
    { id: `${s}-reply`, text: `re ${s}`, content: { reply_to: `${s}-img`, mentions: [peer] } },
    { id: `${s}-r-mine`, content: { reaction: { message_id: ID(7), emoji: '❤️' } } },
    { id: `${s}-r-theirs`, content: { reaction: { message_id: `${s}-img`, emoji: '', their_own: true } } },
    { id: `${s}-text`, text: `plain ${s}` }
  ]
  await Promise.all(sessions.map(async s => {
    for (const f of frames(s)) {
      const answer = await bridge.net.control({ action: 'inbound', session: s, from: peer, text: f.text || '', ...f })
      assert.equal(answer.ok, true, JSON.stringify(answer))
    }
  }))
  for (const s of sessions) {
    const want = frames(s)
    const got = await Promise.all(want.map(f => links[s].waitFor(x => x.t === 'inbound' && x.id === f.id)))
    const inbound = links[s].frames.filter(x => x.t === 'inbound')
    assert.deepEqual(inbound.map(x => x.id), want.map(f => f.id)) // once each, in order
    const by = Object.fromEntries(got.map(x => [x.id.slice(s.length + 1), x]))
    for (const k of ['img', 'doc', 'ptt', 'stk']) {
      const sentMedia = want.find(f => f.id === `${s}-${k}`).content.media
      const m = by[k].content.media
      assert.equal(m.data, sentMedia.data, k) // decrypted byte-exact
      assert.equal(m.size, Buffer.from(sentMedia.data, 'base64').length)
      assert.equal(m.mime_type, sentMedia.mime_type)
      assert.equal(m.error, undefined)
    }
    assert.equal(by.img.content.media.caption, `photo ${s}`)
    assert.equal(by.img.body, '')
    assert.equal(by.doc.content.media.file_name, `${s}.pdf`)
    assert.equal(by.ptt.content.media.kind, 'voice_note')
    assert.equal(by.stk.content.media.kind, 'sticker')
    assert.match(by.vid.content.media.error, /over the broker's --max-media-bytes \(2097152\)/)
    assert.equal(by.vid.content.media.data, undefined)
    assert.match(by.gone.content.media.error, /download from WhatsApp failed/)
    const oldSent = want.find(f => f.id === `${s}-old`).content.media
    assert.equal(by.old.content.media.error, undefined); assert.equal(by.old.content.media.data, oldSent.data) // re-uploaded through updateMediaMessage, then downloaded
    assert.deepEqual(by.loc.content, { location: { latitude: 52.52, longitude: 13.405, name: 'Alex', address: 'Berlin' } })
    assert.equal(by.reply.body, `re ${s}`)
    assert.deepEqual(by.reply.content, { reply_to: `${s}-img`, mentions: [peer] })
    assert.deepEqual(by['r-mine'].content, { reaction: { message_id: ID(7), emoji: '❤️', from_me: true } })
    assert.deepEqual(by['r-theirs'].content, { reaction: { message_id: `${s}-img`, emoji: '', from_me: false } })
    assert.equal(by.text.body, `plain ${s}`)
    assert.equal(by.text.content, undefined)
  }
}
