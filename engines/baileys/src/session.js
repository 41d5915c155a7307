// One broker link = one WhatsApp login on one Baileys socket.
//
// The broker opens a connection per session link; this object runs the
// socket for it and translates both ways: Baileys events to bridge frames,
// broker frames (send, ping, logout, pairing code, close) to socket calls.
// Auth state is read from and written through to the broker (auth-state.js);
// nothing is kept here once the link ends.

import { WAMessageStatus, downloadMediaMessage, extractMessageContent, getContentType, isJidGroup, jidNormalizedUser } from 'baileys'
import { kvAuthState } from './auth-state.js'
import { closeReason } from './reasons.js'

const QR_FIRST_MS = 60_000 // Baileys' own QR lifetimes (first, then each next)
const QR_NEXT_MS = 20_000
const REPLY_TIMEOUT_MS = 30_000
/** Receipt frames by the message status that implies them (proto WebMessageInfo.Status). */
const RECEIPTS = [
  [WAMessageStatus.DELIVERY_ACK, 'delivered'],
  [WAMessageStatus.READ, 'read'],
  [WAMessageStatus.PLAYED, 'played']
]

/** Baileys' media message types by the broker's media kind names. */
const INBOUND_MEDIA = { imageMessage: 'image', videoMessage: 'video', audioMessage: 'audio', documentMessage: 'document', stickerMessage: 'sticker' }
export const DEFAULT_MAX_MEDIA_BYTES = 16 * 1024 * 1024

/**
 * What the broker carries of an inbound Baileys message: its text (`body`) and,
 * beyond text, its content (docs/protocol.md "Content": a medium's metadata, a
 * location, a reaction, the quoted message's id, mentions), or null for a kind
 * the broker does not carry (polls, protocol messages, ...). Wrappers (ephemeral,
 * view once, document with caption) are unwrapped with Baileys' own helper.
 */
export function fromMessage (message) {
  const inner = extractMessageContent(message)
  if (!inner) return null
  const type = getContentType(inner)
  if (type === 'conversation') return typeof inner.conversation === 'string' ? { body: inner.conversation, content: null } : null
  const part = inner[type]
  if (!part || typeof part !== 'object') return null
  const content = {}
  let body = ''
  if (type === 'extendedTextMessage') {
    if (typeof part.text !== 'string') return null
    body = part.text
  } else if (INBOUND_MEDIA[type]) {
    const kind = type === 'audioMessage' && part.ptt ? 'voice_note' : INBOUND_MEDIA[type]
    content.media = { kind, mime_type: String(part.mimetype || ''), caption: String(part.caption || ''), file_name: String(part.fileName || ''), size: Number(part.fileLength || 0) }
  } else if (type === 'locationMessage' || type === 'liveLocationMessage') {
    content.location = { latitude: Number(part.degreesLatitude || 0), longitude: Number(part.degreesLongitude || 0), name: String(part.name || ''), address: String(part.address || '') }
  } else if (type === 'reactionMessage') {
    const key = part.key || {}
    if (!key.id) return null
    // Baileys has already turned the key to our side: fromMe = a message we sent.
    content.reaction = { message_id: String(key.id), emoji: String(part.text || ''), from_me: Boolean(key.fromMe) }
  } else {
    return null
  }
  const context = part.contextInfo
  if (context && context.stanzaId) content.reply_to = String(context.stanzaId)
  if (context && Array.isArray(context.mentionedJid) && context.mentionedJid.length) content.mentions = context.mentionedJid.map(String)
  return { body, content: Object.keys(content).length ? content : null }
}

/** The Send `to` as a JID: E.164 numbers become user JIDs, JIDs pass as they are. */
export function toJid (to) {
  if (to.includes('@')) return to
  return `${to.replace(/^\+/, '')}@s.whatsapp.net`
}

const MEDIA_KEYS = { image: 'image', video: 'video', audio: 'audio', voice_note: 'audio', document: 'document', sticker: 'sticker' }
const BROKER_ID = /^m-[0-9a-f]{32}$/
const PRESENCE = new Set(['available', 'composing', 'recording', 'paused'])

/**
 * Baileys' AnyMessageContent and send options for a `send` frame: plain
 * `{text}` without `content`, else the content's kind (docs/protocol.md
 * "Content", media as base64), its mentions and the quoted message. A quoted
 * or reacted-to message is named by id only; it counts as ours when it has a
 * broker message id (`m-` and 32 hex digits: the id we sent it under).
 */
export function toMessage ({ id, to, body, content }) {
  const jid = toJid(to)
  const options = { messageId: id }
  if (!content || typeof content !== 'object') return { jid, message: { text: body }, options }
  let message
  if (content.media) {
    const m = content.media
    const key = MEDIA_KEYS[m.kind]
    if (!key) throw new Error(`unknown media kind ${String(m.kind).slice(0, 20)}`)
    message = { [key]: Buffer.from(String(m.data), 'base64'), mimetype: m.mime_type }
    if (m.kind === 'audio' || m.kind === 'voice_note') message.ptt = m.kind === 'voice_note'
    if (m.caption && key !== 'audio' && key !== 'sticker') message.caption = m.caption
    if (key === 'document') message.fileName = m.file_name || 'file'
  } else if (content.location) {
    const l = content.location
    message = { location: { degreesLatitude: l.latitude, degreesLongitude: l.longitude } }
    if (l.name) message.location.name = l.name
    if (l.address) message.location.address = l.address
  } else if (content.reaction) {
    const r = content.reaction
    const fromMe = Boolean(r.from_me) || BROKER_ID.test(r.message_id)
    message = { react: { text: r.emoji || '', key: { remoteJid: jid, id: r.message_id, fromMe } } }
  } else {
    message = { text: typeof content.text === 'string' ? content.text : body }
  }
  if (Array.isArray(content.mentions) && content.mentions.length) {
    message.mentions = content.mentions.map(toJid)
  }
  if (content.reply_to) {
    const quoted = String(content.reply_to)
    options.quoted = { key: { remoteJid: jid, id: quoted, fromMe: BROKER_ID.test(quoted) }, message: { conversation: '' } }
  }
  return { jid, message, options }
}

export class BridgeSession {
  /**
   * @param {object} o
   * @param {string} o.sessionId
   * @param {(frame: object) => boolean} o.write  sends one frame to the broker
   * @param {() => void} o.done  the link is over (close the connection)
   * @param {(config: object) => object} o.makeSocket  makeWASocket, or a fake
   * @param {object} o.options  {version, waWebSocketUrl, maxMediaBytes}
   * @param {object} o.logger
   */
  constructor ({ sessionId, write, done, makeSocket, options, logger }) {
    this.sessionId = sessionId
    this.write = write
    this.done = done
    this.makeSocket = makeSocket
    this.options = options || {}
    this.logger = logger
    this.sock = null
    this.state = 'connecting'
    this.closed = false
    this.rid = 0
    this.pending = new Map() // rid -> {resolve, reject, timer}
    this.sendChain = Promise.resolve()
    this.handed = new Set() // ids given to sendMessage on this socket
    this.unacked = new Set() // of those, not yet acked by the server
    this.delivered = new Set()
    this.qrIndex = 0
    this.inboundChain = Promise.resolve() // inbound frames in arrival order, media downloaded first
    this.maxMediaBytes = this.options.maxMediaBytes || DEFAULT_MAX_MEDIA_BYTES
  }

  // -- requests to the broker (kv, sent-message record) --

  request (t, body) {
    if (this.closed) return Promise.reject(new Error('link closed'))
    const rid = ++this.rid
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(rid)
        reject(new Error(`broker did not answer ${t}`))
      }, REPLY_TIMEOUT_MS)
      this.pending.set(rid, { resolve, reject, timer })
      this.write({ t, rid, ...body })
    })
  }

  get kv () {
    return {
      get: keys => this.request('kv_get', { keys }).then(r => r.values || {}),
      set: values => this.request('kv_set', { values }).then(() => undefined),
      clear: () => this.request('kv_clear', {}).then(() => undefined)
    }
  }

  async getMessage (key) {
    try {
      const reply = await this.request('get_message', { id: key.id, to: key.remoteJid })
      return typeof reply.body === 'string' ? { conversation: reply.body } : undefined
    } catch {
      return undefined
    }
  }

  // -- the socket --

  async start () {
    const auth = await kvAuthState(this.kv, this.logger)
    if (this.closed) return
    const config = {
      auth: auth.state,
      logger: this.logger,
      markOnlineOnConnect: false,
      syncFullHistory: false,
      getMessage: key => this.getMessage(key)
    }
    if (this.options.version) config.version = this.options.version
    if (this.options.waWebSocketUrl) config.waWebSocketUrl = this.options.waWebSocketUrl
    const sock = this.makeSocket(config, { sessionId: this.sessionId })
    this.sock = sock
    sock.ev.on('creds.update', () => {
      auth.saveCreds().catch(err => this.fail(`store refused the credentials: ${err.message}`))
    })
    sock.ev.on('connection.update', update => this.onConnection(update))
    sock.ev.on('messages.upsert', upsert => this.onUpsert(upsert))
    sock.ev.on('messages.update', updates => this.onUpdates(updates))
    sock.ws.on('CB:ack,class:message', node => this.onServerAck(node))
  }

  onConnection (update) {
    if (this.closed) return
    const { connection, qr, isNewLogin, lastDisconnect } = update
    if (qr) {
      this.qrIndex += 1
      this.write({ t: 'qr', code: qr, index: this.qrIndex, expires_in_ms: this.qrIndex === 1 ? QR_FIRST_MS : QR_NEXT_MS })
    }
    if (isNewLogin) {
      const me = this.sock.authState?.creds?.me || this.sock.user || {}
      this.write({ t: 'paired', me: me.id || '' })
    }
    if (connection === 'open') {
      this.state = 'open'
      const me = this.sock.user || {}
      this.write({ t: 'open', me: me.id || '', lid: me.lid || '' })
    }
    if (connection === 'close') {
      const { code, reason } = closeReason(lastDisconnect)
      this.end({ t: 'close', code, reason })
    }
  }

  onUpsert ({ messages, type }) {
    if (this.closed || type !== 'notify') return
    for (const msg of messages || []) {
      const key = msg.key || {}
      if (key.fromMe || !key.id || !key.remoteJid) continue
      const carried = fromMessage(msg.message)
      if (carried === null) continue
      this.inboundChain = this.inboundChain.then(() => this.inbound(msg, carried))
    }
  }

  /** One inbound frame; a medium's bytes go with it, downloaded with Baileys' helper. */
  async inbound (msg, { body, content }) {
    const key = msg.key
    if (content && content.media) {
      const media = content.media
      if (media.size > this.maxMediaBytes) {
        media.error = `the medium is ${media.size} bytes, over the broker's --max-media-bytes (${this.maxMediaBytes})`
      } else {
        try {
          const data = await this.download(msg)
          if (data.length > this.maxMediaBytes) {
            media.error = `the medium is ${data.length} bytes, over the broker's --max-media-bytes (${this.maxMediaBytes})`
          } else {
            media.data = data.toString('base64')
            media.size = data.length
          }
        } catch (err) {
          media.error = `the download from WhatsApp failed: ${String((err && err.message) || err).slice(0, 300)}`
        }
      }
    }
    if (this.closed) return
    const chat = key.remoteJid
    const raw = isJidGroup(chat) ? (key.participant || '') : chat
    const alt = isJidGroup(chat) ? key.participantAlt : key.remoteJidAlt
    const isLid = raw.endsWith('@lid')
    const sender = isLid && alt ? alt : raw
    const lid = isLid ? raw : (alt && alt.endsWith('@lid') ? alt : '')
    this.write({
      t: 'inbound',
      id: key.id,
      sender: sender ? jidNormalizedUser(sender) : '',
      lid,
      push_name: msg.pushName || '',
      chat,
      ts: Number(msg.messageTimestamp || 0),
      body,
      ...(content ? { content } : {})
    })
  }

  /** A medium's bytes, with Baileys' helper; one re-upload request when WhatsApp's
   * media servers no longer have it (404/410: an old message). */
  async download (msg) {
    const ctx = { logger: this.logger, reuploadRequest: m => this.sock.updateMediaMessage(m) }
    try {
      return await downloadMediaMessage(msg, 'buffer', {}, ctx)
    } catch (err) {
      // The helper re-uploads only for an error with a `status`; its own fetch
      // throws a Boom, whose code is in output.statusCode, so ask here.
      const code = err && err.output && err.output.statusCode
      if (code !== 404 && code !== 410) throw err
      return downloadMediaMessage(await this.sock.updateMediaMessage(msg), 'buffer', {}, ctx)
    }
  }

  onUpdates (updates) {
    if (this.closed) return
    for (const { key, update } of updates || []) {
      if (!key || !key.fromMe || !update || update.status == null) continue
      const status = update.status
      if (status === WAMessageStatus.ERROR) {
        const code = Number((update.messageStubParameters || [])[0])
        this.failed(key.id, code, 'WhatsApp refused the message')
      } else if (status >= WAMessageStatus.SERVER_ACK) {
        this.acked(key.id) // a later status implies the server had it
        // Each receipt once per message, in order (a READ implies DELIVERED).
        for (const [level, name] of RECEIPTS) {
          const seen = `${name}:${key.id}`
          if (status >= level && !this.delivered.has(seen)) {
            this.delivered.add(seen)
            this.write({ t: name, id: key.id })
          }
        }
      }
    }
  }

  /** WhatsApp's server ack of a sent message: `<ack class="message" id=.. [error=..]>`. */
  onServerAck (node) {
    const attrs = (node && node.attrs) || {}
    if (!attrs.id) return
    if (attrs.error) this.failed(attrs.id, Number(attrs.error), 'WhatsApp refused the message')
    else this.acked(attrs.id)
  }

  acked (id) {
    if (!this.unacked.delete(id)) return
    this.write({ t: 'ack', id })
  }

  failed (id, code, reason) {
    if (!this.unacked.delete(id)) return
    this.write({ t: 'failed', id, code: Number.isInteger(code) ? code : 0, reason })
  }

  // -- frames from the broker --

  onFrame (frame) {
    switch (frame.t) {
      case 'reply': {
        const waiter = this.pending.get(frame.rid)
        if (!waiter) return
        this.pending.delete(frame.rid)
        clearTimeout(waiter.timer)
        if (frame.error) waiter.reject(new Error(frame.error))
        else waiter.resolve(frame)
        return
      }
      case 'send':
        this.sendChain = this.sendChain.then(() => this.sendOne(frame))
        return
      case 'presence':
        // Best effort, not ordered with sends: only an open socket tells anyone.
        if (this.state === 'open' && PRESENCE.has(frame.presence) && typeof frame.to === 'string') {
          this.run('presence', () => this.sock.sendPresenceUpdate(frame.presence, toJid(frame.to)))
        }
        return
      case 'ping':
        // Only an open WhatsApp socket answers: the broker's keep-alive
        // measures the WhatsApp link, not this bridge.
        if (this.state === 'open') this.write({ t: 'pong', id: frame.id })
        return
      case 'logout':
        this.run('logout', () => this.sock.logout())
        return
      case 'pair_code':
        this.pairCode(frame)
        return
      case 'close':
        this.end(null)
        return
      default:
        this.logger.warn(`unknown frame ${String(frame.t).slice(0, 40)}`)
    }
  }

  async sendOne (frame) {
    // A message handed to this socket once waits for its ack there; one sent
    // while the socket is not open waits for the broker's resend on the next.
    const { id } = frame
    if (this.closed || this.state !== 'open' || this.handed.has(id)) return
    this.handed.add(id)
    this.unacked.add(id)
    try {
      const { jid, message, options } = toMessage(frame)
      await this.sock.sendMessage(jid, message, options)
    } catch (err) {
      if (this.closed || this.state !== 'open') return // the close says why; resent later
      const code = err && err.output && err.output.statusCode
      this.failed(id, Number.isInteger(code) ? code : 0, (err && err.message) || 'send failed')
    }
  }

  async pairCode ({ rid, phone }) {
    try {
      const code = await this.sock.requestPairingCode(String(phone).replace(/[^0-9]/g, ''))
      this.write({ t: 'reply', rid, code })
    } catch (err) {
      this.write({ t: 'reply', rid, error: (err && err.message) || 'pairing code failed' })
    }
  }

  run (what, fn) {
    Promise.resolve().then(fn).catch(err => this.logger.warn(`${what} failed: ${err && err.message}`))
  }

  /** The store refused a write (fenced, or down): this bridge must not go on as owner. */
  fail (reason) {
    this.end({ t: 'close', code: 428, reason })
  }

  /** Ends the link once: the last frame (if any), the socket, the connection. */
  end (last) {
    if (this.closed) return
    if (last) this.write(last)
    this.closed = true
    this.state = 'closed'
    for (const [, waiter] of this.pending) {
      clearTimeout(waiter.timer)
      waiter.reject(new Error('link closed'))
    }
    this.pending.clear()
    const sock = this.sock
    if (sock) {
      try {
        sock.end(undefined)
      } catch {}
    }
    this.done()
  }
}
