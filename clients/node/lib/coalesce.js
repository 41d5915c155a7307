'use strict';
/**
 * Concurrent `send()` calls of one client, carried on one SendStream call.
 *
 * A unary Send costs a whole gRPC call per message; on the stream, the
 * messages queued in the same turn of the event loop travel in one request,
 * and the results that finished together come back in one response. Each
 * message keeps what a unary Send gives it: its idempotency key, its own
 * deadline (`timeoutMs`), its typed error, FIFO per session in call order. A
 * broken stream fails what it carried with UNAVAILABLE, which `send()` retries
 * with the same keys on a new stream; a broker without SendStream answers
 * UNIMPLEMENTED and the client uses unary Send from then on.
 */

const grpc = require('@grpc/grpc-js');

const { BrokerError, fromSendError, toBrokerError } = require('./errors');

/** Items written together up to this size (a medium alone may be larger). */
const BATCH_BYTES = 1024 * 1024;

/** About how large a SendRequest is on the wire: its texts and its medium. */
function requestBytes(r) {
  const media = r.content && r.content.media;
  return 256 + (r.body ? r.body.length : 0) + (media && media.data ? media.data.length : 0);
}

/** Extra time to wait past an item's own deadline for the broker's answer. */
const ANSWER_MARGIN_MS = 1000;

class StreamUnsupported extends Error {}

class SendStream {
  /**
   * @param {any} stub the broker.v1.Broker client
   * @param {() => import('@grpc/grpc-js').Metadata} metadata
   */
  constructor(stub, metadata) {
    this._stub = stub;
    this._metadata = metadata;
    this._nextRef = 1;
    this._call = null;
    this._waiting = new Map(); // ref -> {resolve, reject, timer}, of the open call
    this._queued = [];
    this._flushScheduled = false;
    this.unsupported = false;
    /** How many SendStream calls were opened. */
    this.opened = 0;
  }

  /**
   * One attempt of one message; resolves with the SendResponse or rejects with
   * the BrokerError a unary Send would have, or StreamUnsupported.
   */
  send(request, timeoutMs) {
    if (this.unsupported) return Promise.reject(new StreamUnsupported());
    const call = this._open();
    const ref = this._nextRef++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        call.waiting.delete(ref);
        reject(new BrokerError(`no answer on the send stream within ${timeoutMs} ms`, {
          code: grpc.status.DEADLINE_EXCEEDED,
        }));
      }, timeoutMs + ANSWER_MARGIN_MS);
      call.waiting.set(ref, { resolve, reject, timer });
      this._queued.push({ ref: String(ref), request, timeoutMs: Math.max(1, Math.round(timeoutMs)) });
      if (!this._flushScheduled) {
        this._flushScheduled = true;
        setImmediate(() => this._flush());
      }
    });
  }

  _flush() {
    this._flushScheduled = false;
    const items = this._queued;
    this._queued = [];
    if (!items.length || !this._call) return;
    // Requests stay within the gRPC message size limit, whatever media they carry.
    let batch = [];
    let size = 0;
    for (const item of items) {
      const bytes = requestBytes(item.request);
      if (batch.length && size + bytes > BATCH_BYTES) {
        this._call.stream.write({ items: batch });
        batch = [];
        size = 0;
      }
      batch.push(item);
      size += bytes;
    }
    this._call.stream.write({ items: batch });
  }

  _open() {
    if (this._call) return this._call;
    const stream = this._stub.SendStream(this._metadata());
    const call = { stream, waiting: new Map() };
    this._call = call;
    this.opened += 1;
    stream.on('data', (response) => {
      for (const result of response.results) {
        const waiter = call.waiting.get(Number(result.ref));
        if (!waiter) continue;
        call.waiting.delete(Number(result.ref));
        clearTimeout(waiter.timer);
        if (result.outcome === 'error') {
          waiter.reject(fromSendError(result.error));
        } else {
          waiter.resolve(result.response);
        }
      }
    });
    const fail = (err) => {
      if (this._call === call) this._call = null;
      for (const waiter of call.waiting.values()) {
        clearTimeout(waiter.timer);
        waiter.reject(err);
      }
      call.waiting.clear();
    };
    stream.on('error', (err) => {
      if (err && err.code === grpc.status.UNIMPLEMENTED) {
        this.unsupported = true;
        fail(new StreamUnsupported());
      } else {
        fail(toBrokerError(err));
      }
    });
    stream.on('end', () => fail(new BrokerError('the send stream ended', {
      code: grpc.status.UNAVAILABLE,
    })));
    return call;
  }

  /** Half-close the stream (unanswered sends fail UNAVAILABLE). */
  close() {
    const call = this._call;
    this._call = null;
    if (call) {
      call.stream.end();
      call.stream.cancel();
    }
  }
}

module.exports = { SendStream, StreamUnsupported, BATCH_BYTES, requestBytes };
