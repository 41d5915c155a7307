'use strict';
/**
 * The broker client: typed wrappers over broker.v1 with the two behaviours a
 * worker must not get wrong on its own:
 *
 * - `send()` always carries an idempotency key and retries UNAVAILABLE with
 *   the *same* key inside one time budget, so a retried call never sends twice;
 * - `watchStatus()` reopens a dropped status stream with `resumeAfter` = the
 *   last event id it handed out, so a reconnecting dashboard misses nothing.
 *
 * The proto is loaded at run time from the repository's proto/ directory
 * (override with the `protoPath` option or BROKER_PROTO_PATH), so there is no
 * generated code to keep in sync.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { BatchSend } = require('./batch');
const { SendStream, StreamUnsupported } = require('./coalesce');
const { BrokerError, ErrorReason, toBrokerError } = require('./errors');

const DEFAULT_TARGET = '127.0.0.1:50051';
/** The gRPC message size limit: the largest medium a broker accepts (64 MiB) and room. */
const MAX_MESSAGE_BYTES = 68 * 1024 * 1024;
const PRESENCES = { available: 'AVAILABLE', composing: 'COMPOSING', recording: 'RECORDING', paused: 'PAUSED' };

/** A medium's content: `data` a Buffer or Uint8Array (base64 strings are decoded). */
function mediaContent(kind, data, mimeType, extra = {}) {
  const bytes = typeof data === 'string' ? Buffer.from(data, 'base64') : Buffer.from(data);
  return {
    media: { kind, data: bytes, mimeType, caption: extra.caption || '', fileName: extra.fileName || '' },
    replyTo: extra.replyTo || '',
    mentions: extra.mentions || [],
  };
}
const BACKOFF_BASE_MS = 100;
const BACKOFF_MAX_MS = 5000;

/** The repository's proto file, two levels above this package. */
function defaultProtoPath() {
  if (process.env.BROKER_PROTO_PATH) return process.env.BROKER_PROTO_PATH;
  return path.resolve(__dirname, '..', '..', '..', 'proto', 'broker', 'v1', 'broker.proto');
}

const packageCache = new Map();

/** Load broker.v1 once per proto file (loading is synchronous and not free). */
function loadBrokerPackage(protoPath = defaultProtoPath()) {
  let pkg = packageCache.get(protoPath);
  if (!pkg) {
    if (!fs.existsSync(protoPath)) {
      throw new Error(`broker.proto not found at ${protoPath} (set protoPath or BROKER_PROTO_PATH)`);
    }
    const definition = protoLoader.loadSync(protoPath, {
      keepCase: false, // camelCase fields: sessionId, idempotencyKey, ...
      longs: Number, // int64 counters and sequences stay far below 2^53
      enums: String, // states as names: "OPEN", "RECONNECTING"
      defaults: true,
      oneofs: true,
      includeDirs: [path.dirname(path.dirname(path.dirname(protoPath)))],
    });
    pkg = grpc.loadPackageDefinition(definition).broker.v1;
    packageCache.set(protoPath, pkg);
  }
  return pkg;
}

/** @param {{seconds?: number|string, nanos?: number} | null | undefined} ts */
function toDate(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds || 0) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

/** What send() resolves with, from the broker's SendResponse. */
function sendResult(response, idempotencyKey) {
  return {
    messageId: response.messageId,
    acked: response.status === 'ACKED',
    duplicate: response.duplicate,
    sequence: response.sequence,
    idempotencyKey,
    acceptedAt: toDate(response.acceptedAt),
    ackedAt: toDate(response.ackedAt),
  };
}

/** Exponential backoff with full jitter; the server's RetryInfo wins when present. */
function backoffMs(attempt, err) {
  if (err && err.retryAfterMs != null) return Math.min(err.retryAfterMs, 60000);
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (attempt - 1));
  return Math.random() * ceiling;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) return reject(signal.reason);
    const timer = setTimeout(done, ms);
    function done() {
      if (signal) signal.removeEventListener('abort', abort);
      resolve();
    }
    function abort() {
      clearTimeout(timer);
      reject(signal.reason);
    }
    if (signal) signal.addEventListener('abort', abort, { once: true });
  });
}

/** Status streams also resume after being dropped as a too-slow subscriber. */
function isReconnectable(err) {
  return err.code === grpc.status.UNAVAILABLE ||
    (err.code === grpc.status.RESOURCE_EXHAUSTED && err.reason === ErrorReason.SUBSCRIBER_TOO_SLOW);
}

function toEvent(ev) {
  return { ...ev, at: toDate(ev.at) };
}

class BrokerClient {
  /**
   * @param {string} [target]
   * @param {import('../index').BrokerClientOptions} [options]
   */
  constructor(target = DEFAULT_TARGET, options = {}) {
    const {
      timeoutMs = 10000,
      retryAttempts = 5,
      reconnectAttempts = 10,
      credentials = grpc.credentials.createInsecure(),
      token = null,
      protoPath = defaultProtoPath(),
      channelOptions = {},
      coalesce = true,
    } = options;
    this.target = target;
    this.timeoutMs = timeoutMs;
    this.retryAttempts = retryAttempts;
    this.reconnectAttempts = reconnectAttempts;
    this._token = token;
    const pkg = loadBrokerPackage(protoPath);
    this._stub = new pkg.Broker(target, credentials, {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      ...channelOptions,
    });
    /** Carry concurrent send() calls on one SendStream call (false: unary Send each). */
    this.coalesce = coalesce;
    this._noBatch = false;
    this._sendStream = new SendStream(this._stub, () => this._metadata());
  }

  _metadata() {
    const md = new grpc.Metadata();
    if (this._token) md.set('authorization', `Bearer ${this._token}`);
    return md;
  }

  /** One attempt of a unary call, errors decoded. */
  _unary(method, request, timeoutMs = this.timeoutMs) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + Math.max(1, timeoutMs));
      this._stub[method](request, this._metadata(), { deadline }, (err, response) => {
        if (err) reject(toBrokerError(err));
        else resolve(response);
      });
    });
  }

  /** Retry UNAVAILABLE within `budgetMs` in total; each attempt gets what is left. */
  _unaryRetrying(method, request, budgetMs = this.timeoutMs) {
    return this._retrying((remaining) => this._unary(method, request, remaining), budgetMs);
  }

  /** One attempt of a Send: on the shared SendStream, or unary. */
  async _sendOnce(request, timeoutMs) {
    if (this.coalesce) {
      try {
        return await this._sendStream.send(request, timeoutMs);
      } catch (err) {
        if (!(err instanceof StreamUnsupported)) throw err;
        this.coalesce = false; // an older broker: unary Send from now on
      }
    }
    return this._unary('Send', request, timeoutMs);
  }

  async _retrying(attemptFn, budgetMs) {
    const deadline = Date.now() + budgetMs;
    let last = null;
    for (let attempt = 1; attempt <= this.retryAttempts; attempt++) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) break;
      try {
        return await attemptFn(remaining);
      } catch (err) {
        if (!(err instanceof BrokerError) || !err.retryable) throw err;
        last = err;
        if (attempt === this.retryAttempts) break;
        const wait = Math.min(backoffMs(attempt, err), deadline - Date.now());
        if (wait <= 0) break;
        await sleep(wait);
      }
    }
    throw last || new BrokerError(`retry budget of ${budgetMs} ms exhausted`, {
      code: grpc.status.DEADLINE_EXCEEDED,
    });
  }

  /**
   * Send a message. Retries UNAVAILABLE with one idempotency key, so it never
   * sends twice; an UNAVAILABLE that escapes (reason NOT_DELIVERED_YET) means
   * it is queued but not acked yet: call again with the same key later.
   */
  async send(sessionId, to, body, options = {}) {
    const {
      idempotencyKey = crypto.randomUUID(), wait = true, timeoutMs = this.timeoutMs, content = null,
    } = options;
    const request = { sessionId, to, body: body || '', idempotencyKey, noWait: !wait };
    if (content) request.content = content;
    const response = await this._retrying((left) => this._sendOnce(request, left), timeoutMs);
    return sendResult(response, idempotencyKey);
  }

  // Typed content helpers: send() with one kind of content. `options` takes
  // send()'s options plus the kind's own (caption, replyTo, mentions, ...).

  /** Text that quotes `options.replyTo` (a message id) and/or mentions addresses. */
  sendText(sessionId, to, text, options = {}) {
    const content = { text, replyTo: options.replyTo || '', mentions: options.mentions || [] };
    return this.send(sessionId, to, '', { ...options, content });
  }

  sendImage(sessionId, to, data, mimeType = 'image/jpeg', options = {}) {
    return this.send(sessionId, to, '', { ...options, content: mediaContent('IMAGE', data, mimeType, options) });
  }

  sendVideo(sessionId, to, data, mimeType = 'video/mp4', options = {}) {
    return this.send(sessionId, to, '', { ...options, content: mediaContent('VIDEO', data, mimeType, options) });
  }

  /** Audio; `options.voice` sends it as a voice note. */
  sendAudio(sessionId, to, data, mimeType = 'audio/ogg; codecs=opus', options = {}) {
    const kind = options.voice ? 'VOICE_NOTE' : 'AUDIO';
    return this.send(sessionId, to, '', { ...options, content: mediaContent(kind, data, mimeType, { replyTo: options.replyTo }) });
  }

  sendDocument(sessionId, to, data, mimeType, fileName, options = {}) {
    return this.send(sessionId, to, '', { ...options, content: mediaContent('DOCUMENT', data, mimeType, { ...options, fileName }) });
  }

  sendSticker(sessionId, to, data, mimeType = 'image/webp', options = {}) {
    return this.send(sessionId, to, '', { ...options, content: mediaContent('STICKER', data, mimeType, { replyTo: options.replyTo }) });
  }

  sendLocation(sessionId, to, latitude, longitude, options = {}) {
    const content = {
      location: { latitude, longitude, name: options.name || '', address: options.address || '' },
      replyTo: options.replyTo || '',
    };
    return this.send(sessionId, to, '', { ...options, content });
  }

  /** React to `messageId` in the chat `to` ('' removes the reaction). */
  sendReaction(sessionId, to, messageId, emoji, options = {}) {
    const content = { reaction: { messageId, emoji, fromMe: Boolean(options.fromMe) } };
    return this.send(sessionId, to, '', { ...options, content });
  }

  /**
   * Show `chat` that the session is 'composing' (typing…), 'recording', 'paused'
   * or 'available'. Best effort: never queued, not retried; UNAVAILABLE when
   * the session is not open.
   */
  async sendPresence(sessionId, chat, presence) {
    const value = PRESENCES[String(presence).toLowerCase()];
    if (!value) throw new TypeError(`presence must be one of ${Object.keys(PRESENCES).join(', ')}`);
    await this._unary('SendPresence', { sessionId, chat, presence: value });
  }

  /**
   * Send many messages at once: each one's result, or the BrokerError send()
   * would have thrown for it (returned, not thrown), in the order given.
   * Messages of one session are queued in that order. Without coalescing they
   * go in SendBatch calls (unary Sends would reach the broker in no set
   * order); a broker without SendBatch gets unary Sends.
   * @param {{sessionId: string, to: string, body: string, idempotencyKey?: string}[]} messages
   */
  async sendMany(messages, options = {}) {
    const keyed = messages.map((m) => ({ ...m, idempotencyKey: m.idempotencyKey || crypto.randomUUID() }));
    if (!this.coalesce && !this._noBatch && keyed.length) {
      const batched = await this._sendBatched(keyed, options);
      if (batched) return batched;
      this._noBatch = true; // an older broker: unary Sends from now on
    }
    return Promise.all(keyed.map((m) => this.send(m.sessionId, m.to, m.body, {
      ...options, idempotencyKey: m.idempotencyKey,
    }).catch((err) => {
      if (err instanceof BrokerError) return err;
      throw err;
    })));
  }

  /** sendMany() on SendBatch; null when the broker has none (an older release). */
  async _sendBatched(messages, { wait = true, timeoutMs = this.timeoutMs } = {}) {
    const batch = new BatchSend(this._stub, messages.map((m) => ({
      sessionId: m.sessionId, to: m.to, body: m.body || '', idempotencyKey: m.idempotencyKey,
      noWait: !wait,
    })));
    let outcomes;
    try {
      await this._retrying((left) => batch.attempt(left, this._metadata()), timeoutMs);
      outcomes = batch.outcomes;
    } catch (err) {
      if (!(err instanceof BrokerError)) throw err;
      if (err.code === grpc.status.UNIMPLEMENTED && batch.outcomes.every((o) => o === null)) {
        return null;
      }
      outcomes = batch.settle(err);
    }
    return outcomes.map((o, i) => (o instanceof BrokerError ? o : sendResult(o, messages[i].idempotencyKey)));
  }

  /** Live status events (a snapshot first), resuming after stream failures. */
  watchStatus(options = {}) {
    return new StatusWatch(this, options);
  }

  async health(sessionIds = [], tenant = '') {
    return (await this.healthReport(sessionIds, tenant)).sessions;
  }

  /** The whole Health answer: `sessions`, plus the answering instance's `engine`
   * (`name`, `up`, `detail`, `starts`, `since`) and the store's `durability`. */
  healthReport(sessionIds = [], tenant = '') {
    return this._unaryRetrying('Health', { sessionIds, tenant });
  }

  createSession(sessionId, { tenant = '', start = true } = {}) {
    return this._unaryRetrying('CreateSession', { sessionId, tenant, noStart: !start });
  }

  getSession(sessionId) {
    return this._unaryRetrying('GetSession', { sessionId });
  }

  /** How far a sent message got: `status` (e.g. 'MESSAGE_DELIVERED'), `statusAt`,
   * and for a refusal `code` and `reason`. */
  getMessage(sessionId, messageId) {
    return this._unaryRetrying('GetMessage', { sessionId, messageId });
  }

  /** The bytes of an inbound message's medium, as a Buffer (`messageId`: its
   * `upstreamId`; its `content.media` has the MIME type and size). Fails with
   * reason MEDIA_NOT_FOUND when it is not kept, MEDIA_UNAVAILABLE when it could
   * not be (`content.media.downloadError` says why). */
  downloadMedia(sessionId, messageId) {
    return this._retrying((remaining) => new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + Math.max(1, remaining));
      const call = this._stub.DownloadMedia({ sessionId, messageId }, this._metadata(), { deadline });
      const parts = [];
      call.on('data', (chunk) => parts.push(chunk.data));
      call.on('error', (err) => reject(toBrokerError(err)));
      call.on('end', () => resolve(Buffer.concat(parts)));
    }), this.timeoutMs);
  }

  async listSessions(tenant = '') {
    return (await this._unaryRetrying('ListSessions', { tenant })).sessions;
  }

  getQr(sessionId) {
    return this._unaryRetrying('GetQr', { sessionId });
  }

  // The 8-character code to type into the phone while the session is pairing;
  // not retried (each call asks for a new code).
  async requestPairingCode(sessionId, phoneNumber) {
    const reply = await this._unary('RequestPairingCode', { sessionId, phoneNumber });
    return reply.code;
  }

  close() {
    this._sendStream.close();
    this._stub.close();
  }
}

/** A resumable StreamStatus subscription; iterate it with `for await`. */
class StatusWatch {
  constructor(client, { sessionIds = [], tenant = '', resumeAfter = '', signal } = {}) {
    this._client = client;
    this._request = { sessionIds, tenant };
    this._signal = signal;
    this._call = null;
    this._closed = false;
    /** `eventId` of the last event handed out; pass it as `resumeAfter` elsewhere. */
    this.lastEventId = resumeAfter;
    /** How many times the stream was reopened after a failure. */
    this.reconnects = 0;
  }

  /** Stop watching: cancels the stream; iteration ends. */
  close() {
    this._closed = true;
    if (this._call) this._call.cancel();
  }

  async *[Symbol.asyncIterator]() {
    const signal = this._signal;
    const onAbort = () => this.close();
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
    let failures = 0;
    try {
      while (!this._closed) {
        const call = this._client._stub.StreamStatus(
          { ...this._request, resumeAfter: this.lastEventId }, this._client._metadata());
        this._call = call;
        let error;
        try {
          for await (const event of call) {
            failures = 0; // every delivered event starts a fresh reconnect budget
            if (event.eventId) this.lastEventId = event.eventId;
            yield toEvent(event);
          }
          // The broker never ends a live stream on its own: it is restarting.
          error = new BrokerError('status stream ended by the broker', {
            code: grpc.status.UNAVAILABLE, reason: ErrorReason.STREAM_ENDED,
          });
        } catch (err) {
          error = toBrokerError(err);
        } finally {
          call.cancel();
          this._call = null;
        }
        if (this._closed) return;
        if (!isReconnectable(error) || ++failures > this._client.reconnectAttempts) throw error;
        try {
          await sleep(backoffMs(failures, error), signal);
        } catch (abortReason) {
          if (this._closed) return; // aborted while waiting: just stop
          throw abortReason;
        }
        this.reconnects += 1;
      }
    } finally {
      if (signal) signal.removeEventListener('abort', onAbort);
      this.close();
    }
  }
}

module.exports = { BrokerClient, StatusWatch, DEFAULT_TARGET, loadBrokerPackage, defaultProtoPath };
