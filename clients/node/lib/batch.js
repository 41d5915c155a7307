'use strict';
/**
 * `sendMany()` without the stream: SendBatch calls, which queue items in list order.
 *
 * Concurrent unary Sends reach the broker's handlers in no set order (gRPC
 * orders nothing between calls), so a client that does not coalesce sends a
 * list with SendBatch instead: the broker places each session's items in the
 * order of the list. One attempt sends what is still pending, in requests of
 * up to BATCH_BYTES, and stops after the first request with an item that
 * failed in a way worth retrying (UNAVAILABLE), so that later items of its
 * session do not overtake it; the client's retry policy then sends the
 * pending items again, with the same keys.
 */

// Items of one request add up to at most BATCH_BYTES (an item alone may be larger), as on the stream.
const { BATCH_BYTES, requestBytes } = require('./coalesce');
const { fromSendError, toBrokerError } = require('./errors');

class BatchSend {
  /**
   * @param {any} stub the broker.v1.Broker client
   * @param {object[]} requests SendRequests, in list order
   */
  constructor(stub, requests) {
    this._stub = stub;
    this._requests = requests;
    /** Per item: the broker's SendResponse, the last BrokerError, or null (never answered). */
    this.outcomes = requests.map(() => null);
    /** Items still to send, in list order. */
    this.pending = requests.map((_, i) => i);
  }

  /**
   * Send the pending items. Rejects with the first retryable item error while
   * any item is left to retry, or with the call's own error (its items stay pending).
   */
  async attempt(timeoutMs, metadata) {
    const deadline = Date.now() + timeoutMs;
    const left = this.pending;
    let start = 0;
    while (start < left.length) {
      const chunk = this._chunk(left, start);
      // No item deadline: each waits what the call has left, less the broker's
      // margin to answer, as a unary Send does.
      const request = { items: chunk.map((i) => ({ ref: String(i), request: this._requests[i] })) };
      let response;
      try {
        response = await this._call(request, Math.max(1, deadline - Date.now()), metadata);
      } catch (err) {
        this.pending = left.slice(start);
        throw err;
      }
      start += chunk.length;
      const retry = [];
      let first = null;
      for (const result of response.results) {
        const i = Number(result.ref);
        if (result.outcome === 'error') {
          const error = fromSendError(result.error);
          this.outcomes[i] = error;
          if (error.retryable) {
            retry.push(i);
            first = first || error;
          }
        } else {
          this.outcomes[i] = result.response;
        }
      }
      if (first) {
        this.pending = retry.concat(left.slice(start));
        throw first;
      }
    }
    this.pending = [];
  }

  _call(request, timeoutMs, metadata) {
    return new Promise((resolve, reject) => {
      this._stub.SendBatch(request, metadata, { deadline: new Date(Date.now() + timeoutMs) },
        (err, response) => (err ? reject(toBrokerError(err)) : resolve(response)));
    });
  }

  _chunk(left, start) {
    const chunk = [left[start]];
    let size = requestBytes(this._requests[left[start]]);
    for (let n = start + 1; n < left.length; n++) {
      size += requestBytes(this._requests[left[n]]);
      if (size > BATCH_BYTES) break;
      chunk.push(left[n]);
    }
    return chunk;
  }

  /**
   * Every item's outcome once retrying stopped with `error`: an item never
   * answered takes it; one that was keeps what the broker last said about it.
   */
  settle(error) {
    return this.outcomes.map((outcome) => (outcome === null ? error : outcome));
  }
}

module.exports = { BatchSend };
