'use strict';
/**
 * Broker errors: the gRPC status code plus the machine-readable reason the
 * broker puts in a google.rpc.ErrorInfo (domain "broker.v1"), and the
 * RetryInfo delay when waiting helps. Callers branch on `reason`, never on
 * message text.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
const { ErrorReason } = require('./reasons');

const DOMAIN = 'broker.v1';

const root = new protobuf.Root().loadSync(path.join(__dirname, 'rpc_status.proto'), {
  keepCase: true,
});
const Status = root.lookupType('google.rpc.Status');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
const RetryInfo = root.lookupType('google.rpc.RetryInfo');

/** Status code number -> name, e.g. 14 -> "UNAVAILABLE". */
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

class BrokerError extends Error {
  /**
   * @param {string} message
   * @param {{code: number, reason?: string, metadata?: Record<string, string>,
   *          retryAfterMs?: number | null, cause?: unknown}} fields
   */
  constructor(message, { code, reason = '', metadata = {}, retryAfterMs = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'BrokerError';
    /** gRPC status code number (see `grpc.status`). */
    this.code = code;
    /** e.g. "UNAVAILABLE". */
    this.codeName = CODE_NAMES[code] || String(code);
    /** Machine-readable reason, an `ErrorReason` name such as "NOT_DELIVERED_YET" ("" if none). */
    this.reason = reason;
    /** ErrorInfo metadata, e.g. {session_id, state}. */
    this.metadata = metadata;
    /** The server's RetryInfo delay in milliseconds, or null. */
    this.retryAfterMs = retryAfterMs;
  }

  /** True for UNAVAILABLE: the one code where retrying with the same key is safe. */
  get retryable() {
    return this.code === grpc.status.UNAVAILABLE;
  }

  toString() {
    return `${this.codeName}${this.reason ? ' ' + this.reason : ''}: ${this.message}`;
  }
}

/**
 * Decode rich error details from a grpc-js ServiceError's trailers.
 * @param {import('@grpc/grpc-js').Metadata | undefined} trailers
 */
function decodeDetails(trailers) {
  const out = { reason: '', metadata: {}, retryAfterMs: null };
  const raw = trailers ? trailers.get('grpc-status-details-bin') : [];
  if (!raw || raw.length === 0) return out;
  let status;
  try {
    status = Status.decode(Buffer.isBuffer(raw[0]) ? raw[0] : Buffer.from(String(raw[0])));
  } catch {
    return out; // undecodable details: the code alone still tells what happened
  }
  let foundOurs = false;
  for (const any of status.details) {
    const type = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (type === 'google.rpc.ErrorInfo') {
      const info = ErrorInfo.decode(any.value);
      const ours = info.domain === DOMAIN;
      // Prefer our own domain's ErrorInfo over anything a proxy added.
      if (!foundOurs && (ours || !out.reason)) {
        out.reason = info.reason;
        out.metadata = { ...info.metadata };
        foundOurs = ours;
      }
    } else if (type === 'google.rpc.RetryInfo') {
      const info = RetryInfo.decode(any.value);
      const d = info.retry_delay;
      if (d) out.retryAfterMs = Number(d.seconds || 0) * 1000 + Math.round((d.nanos || 0) / 1e6);
    }
  }
  return out;
}

/**
 * Turn anything a grpc-js call failed with into a BrokerError.
 * @param {any} err
 * @returns {BrokerError}
 */
function toBrokerError(err) {
  if (err instanceof BrokerError) return err;
  if (err && typeof err.code === 'number') {
    const { reason, metadata, retryAfterMs } = decodeDetails(err.metadata);
    return new BrokerError(err.details || err.message, {
      code: err.code, reason, metadata, retryAfterMs, cause: err,
    });
  }
  return new BrokerError(String((err && err.message) || err), {
    code: grpc.status.UNKNOWN, cause: err,
  });
}

/** The BrokerError one failed item of SendStream/SendBatch (a SendError) stands for:
 * what a unary Send of that message would have thrown. */
function fromSendError(e) {
  return new BrokerError(e.message, {
    code: e.code, reason: e.reason, metadata: e.metadata || {},
    retryAfterMs: e.retryAfterMs ? Number(e.retryAfterMs) : null,
  });
}

module.exports = { BrokerError, DOMAIN, ErrorReason, toBrokerError, fromSendError, decodeDetails, CODE_NAMES };
