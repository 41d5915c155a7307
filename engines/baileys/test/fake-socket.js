// A scripted stand-in for WhatsApp behind makeWASocket, for tests only.
//
// It has the surface the bridge uses (ev, ws, user, authState, sendMessage,
// requestPairingCode, logout, end) and emits Baileys' real event shapes:
// connection.update with qr / isNewLogin / open / close + a Boom error whose
// output.statusCode is the reason, creds.update, messages.upsert,
// messages.update, and the server's <ack class="message"> stanza on `ws`.
// Whether a login is paired comes only from the creds it is given (creds.me),
// as with WhatsApp, so a login moved to another bridge opens without pairing.
// A control API (HTTP on loopback) scripts it from pytest; `record` tells
// what it saw.

import { EventEmitter } from 'node:events'
import { createHash, randomBytes } from 'node:crypto'
import { createServer } from 'node:http'
import { Boom } from '@hapi/boom'
import { readFile, unlink } from 'node:fs/promises'
import { Curve, DEFAULT_CONNECTION_CONFIG, addTransactionCapability, cleanMessage, encryptedStream, generateSignalPubKey, jidNormalizedUser } from 'baileys'
import { makeLogger } from '../src/log.js'

const quiet = makeLogger('fatal')

const fingerprint = creds => createHash('sha256').update(Buffer.from(creds.noiseKey.public)).digest('hex').slice(0, 16)

/** A JSON-able copy of what sendMessage got: every Buffer as {bytes, sha256, base64}. */
export function describe (value) {
  if (Buffer.isBuffer(value)) {
    return { bytes: value.length, sha256: createHash('sha256').update(value).digest('hex'), base64: value.toString('base64') }
  }
  if (Array.isArray(value)) return value.map(describe)
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined).map(([k, v]) => [k, describe(v)]))
  }
  return value
}

export function makeFakeNetwork ({ qrIntervalMs = 60_000 } = {}) {
  const net = {
    sockets: new Map(), // session -> current FakeSocket
    connects: new Map(), // session -> count
    sent: [], // {session, id, jid, text, socket, content, quoted}
    presence: [], // {session, type, jid, socket}
    dropMedia: new Map(), // session -> media sends to drop the socket in (mid-upload)
    pairingCodes: new Map(), // session -> {code, phone}
    failConnect: new Map(), // session -> {code, message, times}
    failSend: new Map(), // session -> code of the next send's error ack
    fingerprints: new Map(), // session -> noise key fingerprint per connect
    flaps: new Map(), // session -> timer
    cdn: new Map(), // media path -> encrypted bytes, as WhatsApp's media servers hold them
    downloads: [], // media paths fetched from the cdn
    qrIntervalMs,
    socketSeq: 0
  }

  class FakeSocket {
    constructor (config, meta) {
      this.config = config
      this.session = (meta && meta.sessionId) || 'default'
      this.authState = config.auth
      this.ev = new EventEmitter()
      this.ws = new EventEmitter()
      this.closed = false
      this.open = false
      this.n = ++net.socketSeq
      this.qrTimer = null
      this.qrCount = 0
      this.user = undefined
      net.sockets.set(this.session, this)
      net.connects.set(this.session, (net.connects.get(this.session) || 0) + 1)
      const prints = net.fingerprints.get(this.session) || []
      prints.push(fingerprint(config.auth.creds))
      net.fingerprints.set(this.session, prints)
      setImmediate(() => this.handshake())
    }

    emit (event, data) {
      if (!this.closed || event === 'connection.update') this.ev.emit(event, data)
    }

    handshake () {
      if (this.closed) return
      this.emit('connection.update', { connection: 'connecting', receivedPendingNotifications: false, qr: undefined })
      const fail = net.failConnect.get(this.session)
      if (fail && fail.times !== 0) {
        fail.times -= 1
        this.end(new Boom(fail.message || 'Connection Failure', { statusCode: fail.code }))
        return
      }
      const creds = this.authState.creds
      if (creds.me && creds.me.id && creds.registered) {
        this.goOpen()
        return
      }
      this.nextQr()
    }

    nextQr () {
      if (this.closed || this.open) return
      this.qrCount += 1
      this.emit('connection.update', { qr: `2@fake-ref-${this.session}-${this.n}-${this.qrCount},noise,identity,adv` })
      this.qrTimer = setTimeout(() => this.nextQr(), net.qrIntervalMs)
    }

    async pair (phone) {
      clearTimeout(this.qrTimer)
      const creds = this.authState.creds
      // As on a real pairing: pre-keys are uploaded (written to the key store),
      // then the creds learn who they are, then the server asks for a restart.
      const preKeys = {}
      for (let id = 1; id <= 3; id++) preKeys[id] = Curve.generateKeyPair()
      await this.authState.keys.set({ 'pre-key': preKeys })
      const update = { me: { id: `${phone}:7@s.whatsapp.net`, name: '~' }, registered: true, platform: 'fake', nextPreKeyId: 4, firstUnuploadedPreKeyId: 4 }
      Object.assign(creds, update)
      this.emit('creds.update', update)
      this.emit('connection.update', { isNewLogin: true, qr: undefined })
      setImmediate(() => this.end(new Boom('Stream Errored (restart required)', { statusCode: 515 })))
    }

    goOpen () {
      const creds = this.authState.creds
      const lid = `${creds.me.id.split(':')[0].split('@')[0]}9@lid`
      this.user = { ...creds.me, lid }
      this.open = true
      const update = { me: { ...creds.me, lid } }
      Object.assign(creds, update)
      this.emit('creds.update', update)
      this.emit('connection.update', { connection: 'open' })
    }

    async sendMessage (jid, content, options) {
      if (this.closed || !this.open) throw new Boom('Connection Closed', { statusCode: 428 })
      const id = options.messageId
      // A session with this peer, as relayMessage would store one before it
      // writes the stanza; the socket may drop meanwhile, and then nothing went out.
      await this.authState.keys.set({ session: { [`${jid.split('@')[0]}.0`]: randomBytes(64) } })
      if (this.closed || !this.open) throw new Boom('Connection Closed', { statusCode: 428 })
      const media = ['image', 'video', 'audio', 'document', 'sticker'].some(k => Buffer.isBuffer(content[k]))
      const drops = net.dropMedia.get(this.session) || 0
      if (media && drops > 0) {
        // The connection breaks while the medium uploads: nothing reached WhatsApp.
        net.dropMedia.set(this.session, drops - 1)
        this.end(new Boom('Connection Lost', { statusCode: 408 }))
        throw new Boom('Connection Closed', { statusCode: 428 })
      }
      const quoted = options.quoted ? describe(options.quoted) : undefined
      net.sent.push({ session: this.session, id, jid, text: content.text, socket: this.n, content: describe(content), quoted })
      const error = net.failSend.get(this.session)
      net.failSend.delete(this.session)
      const attrs = { class: 'message', id, from: jid, t: String(Math.floor(Date.now() / 1000)) }
      if (error) attrs.error = String(error)
      // The server acks what it received before anything else can happen here.
      queueMicrotask(() => { if (!this.closed) this.ws.emit('CB:ack,class:message', { tag: 'ack', attrs }) })
      if (!error) {
        setImmediate(() => this.emit('messages.update', [{ key: { remoteJid: jid, fromMe: true, id }, update: { status: 3, messageTimestamp: Math.floor(Date.now() / 1000) } }]))
      }
      return { key: { remoteJid: jid, fromMe: true, id }, message: { conversation: content.text }, status: 1 }
    }

    /** Baileys' own signal repository over this socket's (broker-backed) key store,
     * wrapped in transactions the way makeWASocket wraps it. */
    get repo () {
      if (!this._repo) {
        const keys = addTransactionCapability(this.authState.keys, quiet, { maxCommitRetries: 3, delayBetweenTriesMs: 10 })
        this._repo = DEFAULT_CONNECTION_CONFIG.makeSignalRepository({ creds: this.authState.creds, keys }, quiet)
      }
      return this._repo
    }

    /** The pre-key bundle WhatsApp's server would hand out for this login. */
    async bundle () {
      const creds = this.authState.creds
      const preKeys = await this.authState.keys.get('pre-key', ['1'])
      const preKey = preKeys['1']
      return {
        registrationId: creds.registrationId,
        identityKey: generateSignalPubKey(creds.signedIdentityKey.public),
        signedPreKey: { keyId: creds.signedPreKey.keyId, publicKey: generateSignalPubKey(creds.signedPreKey.keyPair.public), signature: creds.signedPreKey.signature },
        preKey: preKey ? { keyId: 1, publicKey: generateSignalPubKey(preKey.public) } : undefined
      }
    }

    async sendPresenceUpdate (type, jid) {
      if (this.closed || !this.open) throw new Boom('Connection Closed', { statusCode: 428 })
      net.presence.push({ session: this.session, type, jid, socket: this.n })
    }

    async requestPairingCode (phone) {
      const code = randomBytes(4).toString('hex').toUpperCase()
      net.pairingCodes.set(this.session, { code, phone })
      const update = { pairingCode: code, me: { id: `${phone}@s.whatsapp.net`, name: '~' } }
      Object.assign(this.authState.creds, update)
      this.emit('creds.update', update)
      return code
    }

    async inbound ({ id, from, lid, text, push_name: pushName, chat, content }) {
      const group = chat && chat.endsWith('@g.us')
      const key = group
        ? { remoteJid: chat, fromMe: false, id, participant: lid || from, participantAlt: lid ? from : undefined }
        : { remoteJid: lid || from, fromMe: false, id, remoteJidAlt: lid ? from : undefined }
      const me = jidNormalizedUser(this.authState.creds.me.id)
      const message = content ? await net.waMessage(content, text, key.remoteJid, me) : { conversation: text }
      const msg = { key, message, pushName: pushName || '', messageTimestamp: Math.floor(Date.now() / 1000) }
      // What the real socket does to every message before it emits it (a reaction's
      // key turned to this login's side, among others).
      cleanMessage(msg, this.authState.creds.me.id, this.user && this.user.lid)
      this.emit('messages.upsert', { type: 'notify', messages: [msg] })
    }

    /** Baileys' media re-upload request (a medium gone from the servers): hosted again. */
    async updateMediaMessage (msg) {
      const inner = Object.values(msg.message)[0]
      const bytes = net.expired.get(inner.directPath)
      if (!bytes) throw new Boom('media not found for re-upload', { statusCode: 404 })
      net.expired.delete(inner.directPath)
      const directPath = `${inner.directPath}-again`
      net.cdn.set(directPath, bytes)
      inner.directPath = directPath
      inner.url = `https://mmg.whatsapp.net${directPath}`
      return msg
    }

    async logout () {
      this.end(new Boom('Intentional Logout', { statusCode: 401 }))
    }

    end (error) {
      if (this.closed) return
      this.closed = true
      this.open = false
      clearTimeout(this.qrTimer)
      this.emit('connection.update', { connection: 'close', lastDisconnect: { error, date: new Date() } })
      this.ev.removeAllListeners()
      this.ws.removeAllListeners()
    }
  }

  net.makeSocket = (config, meta) => new FakeSocket(config, meta)
  net.expired = new Map() // media path -> encrypted bytes the servers dropped (410), for re-upload

  const MEDIA = { image: 'imageMessage', video: 'videoMessage', audio: 'audioMessage', voice_note: 'audioMessage', document: 'documentMessage', sticker: 'stickerMessage' }
  let mediaSeq = 0

  /**
   * A WAMessage `message` as a sender's phone makes it, from the broker's content
   * (docs/protocol.md "Content"): a medium encrypted with Baileys' own
   * encryptedStream and put on the fake media servers; `size` (optional) claims
   * another length, `expired` makes the servers answer 410 until re-uploaded,
   * `missing` 404 for good.
   */
  net.waMessage = async (content, text, chat, me) => {
    const context = {}
    if (content.reply_to) Object.assign(context, { stanzaId: content.reply_to, participant: chat, quotedMessage: { conversation: '' } })
    if (content.mentions) context.mentionedJid = content.mentions
    const withContext = part => (Object.keys(context).length ? { ...part, contextInfo: context } : part)
    if (content.media) {
      const m = content.media
      const type = m.kind === 'voice_note' ? 'audio' : m.kind
      const enc = await encryptedStream(Buffer.from(m.data, 'base64'), type)
      const bytes = await readFile(enc.encFilePath)
      await unlink(enc.encFilePath)
      const directPath = `/v/t62.7118-24/fake-${++mediaSeq}.enc`
      if (m.expired) net.expired.set(directPath, bytes)
      else if (!m.missing) net.cdn.set(directPath, bytes)
      const part = {
        url: `https://mmg.whatsapp.net${directPath}`, directPath, mediaKey: enc.mediaKey,
        fileEncSha256: enc.fileEncSha256, fileSha256: enc.fileSha256, fileLength: m.size ?? enc.fileLength, mimetype: m.mime_type
      }
      if (m.caption) part.caption = m.caption
      if (type === 'document') part.fileName = m.file_name || 'file'
      if (type === 'audio') part.ptt = m.kind === 'voice_note'
      return { [MEDIA[m.kind]]: withContext(part) }
    }
    if (content.location) {
      const l = content.location
      return { locationMessage: withContext({ degreesLatitude: l.latitude, degreesLongitude: l.longitude, name: l.name, address: l.address }) }
    }
    if (content.reaction) {
      // As the reacting phone writes the key: from its own side, in its chat with
      // this login (`their_own`: the message reacted to is the reactor's own).
      const r = content.reaction
      return { reactionMessage: { key: { remoteJid: me, fromMe: Boolean(r.their_own), id: r.message_id }, text: r.emoji || '', senderTimestampMs: Date.now() } }
    }
    return Object.keys(context).length ? { extendedTextMessage: withContext({ text }) } : { conversation: text }
  }

  // WhatsApp's media servers, as Baileys' downloads reach them (global fetch):
  // answered from `cdn`, so nothing leaves the machine.
  globalThis.fetch = async (url, init) => {
    const where = new URL(String(url))
    if (where.host !== 'mmg.whatsapp.net') throw new Error(`the fake network has no ${where.host}`)
    net.downloads.push(where.pathname)
    const bytes = net.cdn.get(where.pathname)
    if (bytes) return new Response(bytes, { status: 200 })
    return new Response('gone', { status: net.expired.has(where.pathname) ? 410 : 404 })
  }

  /** One control action; returns a JSON-able answer. */
  net.control = async (body) => {
    const sock = net.sockets.get(body.session)
    const live = sock && !sock.closed ? sock : null
    switch (body.action) {
      case 'scan':
        if (!live) return { ok: false, error: 'no live socket' }
        await live.pair(body.phone || '15550001')
        return { ok: true }
      case 'enter_code': {
        const want = net.pairingCodes.get(body.session)
        if (!live || !want || want.code !== body.code) return { ok: false, error: 'wrong code' }
        await live.pair(want.phone)
        return { ok: true }
      }
      case 'close':
        if (!live) return { ok: false, error: 'no live socket' }
        live.end(new Boom(body.message || 'closed', { statusCode: body.code }))
        return { ok: true }
      case 'receipt': { // the recipient's phone: status 4 READ, 5 PLAYED (Baileys' numbers)
        if (!live || !live.open) return { ok: false, error: 'not open' }
        const jid = (net.sent.find(s => s.session === body.session && s.id === body.id) || {}).jid
        if (!jid) return { ok: false, error: 'no such message' }
        live.emit('messages.update', [{ key: { remoteJid: jid, fromMe: true, id: body.id }, update: { status: body.status } }])
        return { ok: true }
      }
      case 'fail_connect':
        net.failConnect.set(body.session, { code: body.code, message: body.message, times: body.times ?? -1 })
        return { ok: true }
      case 'clear_fail_connect':
        net.failConnect.delete(body.session)
        return { ok: true }
      case 'e2e_send': {
        // Real end-to-end crypto between two logins of this bridge: encrypt with
        // the sender's signal repository, decrypt with the recipient's, both on
        // key stores that live in the broker's store.
        const from = net.sockets.get(body.from)
        const to = net.sockets.get(body.to)
        if (!from || !to || !from.open || !to.open) return { ok: false, error: 'both must be open' }
        const jidFrom = from.authState.creds.me.id
        const jidTo = to.authState.creds.me.id
        if (!(await from.repo.validateSession(jidTo)).exists) {
          await from.repo.injectE2ESession({ jid: jidTo, session: await to.bundle() })
        }
        const { type, ciphertext } = await from.repo.encryptMessage({ jid: jidTo, data: Buffer.from(body.text) })
        const plain = await to.repo.decryptMessage({ jid: jidFrom, type, ciphertext })
        to.inbound({ id: body.id, from: jidFrom.replace(/:\d+@/, '@'), text: Buffer.from(plain).toString() })
        return { ok: true, type }
      }
      case 'get_message': {
        // What Baileys' retry handling would ask of the app for a message it sent.
        if (!live) return { ok: false, error: 'no live socket' }
        const message = await live.config.getMessage({ id: body.id, remoteJid: body.jid || '' })
        return { ok: true, message: message ?? null }
      }
      case 'drop_media':
        net.dropMedia.set(body.session, body.times ?? 1)
        return { ok: true }
      case 'fail_send':
        net.failSend.set(body.session, body.code)
        return { ok: true }
      case 'inbound':
        if (!live || !live.open) return { ok: false, error: 'not open' }
        await live.inbound(body)
        return { ok: true }
      case 'flap': {
        clearTimeout(net.flaps.get(body.session))
        const min = body.min_ms ?? 100
        const max = body.max_ms ?? 500
        const until = Date.now() + (body.for_ms ?? 60_000)
        const tick = () => {
          if (Date.now() > until) return
          const s = net.sockets.get(body.session)
          if (s && s.open) s.end(new Boom('Connection Lost', { statusCode: 408 }))
          net.flaps.set(body.session, setTimeout(tick, min + Math.random() * (max - min)))
        }
        net.flaps.set(body.session, setTimeout(tick, min + Math.random() * (max - min)))
        return { ok: true }
      }
      case 'stop_flap':
        clearTimeout(net.flaps.get(body.session))
        net.flaps.delete(body.session)
        return { ok: true }
      case 'record':
        return {
          ok: true,
          sent: net.sent,
          presence: net.presence,
          downloads: net.downloads,
          connects: Object.fromEntries(net.connects),
          fingerprints: Object.fromEntries(net.fingerprints),
          open: [...net.sockets.values()].filter(s => s.open && !s.closed).map(s => s.session),
          pairing_codes: Object.fromEntries([...net.pairingCodes].map(([k, v]) => [k, v.code]))
        }
      default:
        return { ok: false, error: `unknown action ${body.action}` }
    }
  }

  /** Serves `control` as POST / (JSON in, JSON out) on host:port. */
  net.serveControl = (address) => new Promise((resolve, reject) => {
    const [host, port] = address.split(':')
    const server = createServer((req, res) => {
      let data = ''
      req.on('data', c => { data += c })
      req.on('end', async () => {
        let answer
        try {
          answer = await net.control(JSON.parse(data || '{}'))
        } catch (err) {
          answer = { ok: false, error: err.message }
        }
        res.setHeader('content-type', 'application/json')
        res.end(JSON.stringify(answer))
      })
    })
    server.on('error', reject)
    server.listen(Number(port), host, () => resolve(server))
  })

  return net
}
