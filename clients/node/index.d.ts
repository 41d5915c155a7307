// Types for @session-broker/client (plain JS; field names are the proto's, in camelCase).
import type { ChannelCredentials, ChannelOptions, status } from '@grpc/grpc-js';

export { status };
export { ErrorReason, ErrorReasonName } from './lib/reasons';

export const DEFAULT_TARGET: string;
/** Domain of the broker's google.rpc.ErrorInfo details: "broker.v1". */
export const DOMAIN: string;

export type SessionState =
  | 'SESSION_STATE_UNSPECIFIED'
  | 'STOPPED'
  | 'CONNECTING'
  | 'PAIRING'
  | 'OPEN'
  | 'RECONNECTING'
  | 'LOGGED_OUT'
  | 'CONFLICT'
  | 'FAILED';

export interface BrokerClientOptions {
  /** Default deadline of one call and total budget of a retried call, ms (10000). */
  timeoutMs?: number;
  /** Attempts of a call retried on UNAVAILABLE (5). */
  retryAttempts?: number;
  /** Failed reopenings of a status stream in a row before giving up (10). */
  reconnectAttempts?: number;
  /** Default: insecure (plaintext). */
  credentials?: ChannelCredentials;
  /** Sent as `authorization: Bearer <token>`. */
  token?: string | null;
  /** broker.proto to load (default: ../../proto/broker/v1/broker.proto or BROKER_PROTO_PATH). */
  protoPath?: string;
  channelOptions?: ChannelOptions;
  /** Carry concurrent send() calls on one SendStream call (default true; false: unary Send). */
  coalesce?: boolean;
}

export interface SendOptions {
  /** Makes retries safe; default: a new random UUID (retried internally with the same key). */
  idempotencyKey?: string;
  /** Wait for the upstream ack (true) or return once durably queued. */
  wait?: boolean;
  /** Total budget across retries, ms (default: the client's timeoutMs). */
  timeoutMs?: number;
  /** Media, a location, a reaction, a quote or mentions (broker.v1.Content); the typed helpers fill it. */
  content?: Content;
}

export type MediaKind = 'IMAGE' | 'VIDEO' | 'AUDIO' | 'VOICE_NOTE' | 'DOCUMENT' | 'STICKER';

/** broker.v1.Content: one kind (text, media, location, reaction) plus a quote and mentions. */
export interface Content {
  text?: string;
  media?: { kind: MediaKind; data: Uint8Array; mimeType: string; caption?: string; fileName?: string };
  location?: { latitude: number; longitude: number; name?: string; address?: string };
  reaction?: { messageId: string; emoji: string; fromMe?: boolean };
  /** Quote this message id. */
  replyTo?: string;
  /** Addresses mentioned (E.164 numbers or JIDs). */
  mentions?: string[];
}

/** send()'s options plus a quote and mentions. */
export interface ContentOptions extends Omit<SendOptions, 'content'> {
  replyTo?: string;
  mentions?: string[];
}

export type Presence = 'available' | 'composing' | 'recording' | 'paused';

export interface SendResult {
  messageId: string;
  acked: boolean;
  /** True when this call replayed an earlier call with the same key. */
  duplicate: boolean;
  sequence: number;
  idempotencyKey: string;
  acceptedAt: Date | null;
  ackedAt: Date | null;
}

export interface StatusEvent {
  eventId: string;
  sessionId: string;
  tenant: string;
  sequence: number;
  state: SessionState;
  previousState: SessionState;
  reason: string;
  code: number;
  /** In RECONNECTING: milliseconds until the next attempt. */
  retryInMs: number;
  /** In PAIRING: the QR payload. */
  qr: string;
  at: Date | null;
  snapshot: boolean;
  resync: boolean;
  attempt: number;
}

export interface WatchOptions {
  sessionIds?: string[];
  tenant?: string;
  /** Resume after this event id (a previous watch's lastEventId). */
  resumeAfter?: string;
  /** Aborting ends the iteration. */
  signal?: AbortSignal;
}

export interface Timestamp {
  seconds: number;
  nanos: number;
}

export interface Session {
  sessionId: string;
  tenant: string;
  state: SessionState;
  reason: string;
  code: number;
  hasCredentials: boolean;
  outboxDepth: number;
  sequence: number;
  updatedAt: Timestamp | null;
}

export interface MessageInfo {
  sessionId: string;
  messageId: string;
  /** 'MESSAGE_QUEUED', 'MESSAGE_SERVER_ACK', 'MESSAGE_DELIVERED', 'MESSAGE_READ',
   * 'MESSAGE_PLAYED' or 'MESSAGE_REFUSED'. */
  status: string;
  statusAt?: Timestamp;
  code: number;
  reason: string;
  to: string;
  sequence: string;
  acceptedAt?: Timestamp;
}

export interface QrCode {
  sessionId: string;
  qr: string;
  index: number;
  expiresAt: Timestamp | null;
}

/** The broker.v1 SessionHealth message (see proto/broker/v1/broker.proto). */
export interface SessionHealth {
  session: Session;
  liveState: SessionState;
  recent: Array<{ fromState: SessionState; toState: SessionState; reason: string; code: number;
                  at: Timestamp | null }>;
  counters: Record<string, number>;
  recommendations: Array<{ severity: 'SEVERITY_UNSPECIFIED' | 'INFO' | 'WARNING' | 'CRITICAL';
                           code: string; message: string }>;
  healthy: boolean;
  owner: string;
  lastActivity: Timestamp | null;
}

export class BrokerError extends Error {
  /** gRPC status code number. */
  readonly code: status;
  /** e.g. "UNAVAILABLE". */
  readonly codeName: string;
  /** Machine-readable reason, an `ErrorReason` name such as "NOT_DELIVERED_YET" ("" when none). */
  readonly reason: string;
  readonly metadata: Record<string, string>;
  /** The server's RetryInfo delay, ms, or null. */
  readonly retryAfterMs: number | null;
  /** True for UNAVAILABLE: retry with the same idempotency key. */
  readonly retryable: boolean;
}

export class StatusWatch implements AsyncIterable<StatusEvent> {
  /** eventId of the last event handed out. */
  readonly lastEventId: string;
  /** How many times the stream was reopened after a failure. */
  readonly reconnects: number;
  close(): void;
  [Symbol.asyncIterator](): AsyncIterator<StatusEvent>;
}

export class BrokerClient {
  constructor(target?: string, options?: BrokerClientOptions);
  readonly target: string;
  send(sessionId: string, to: string, body: string, options?: SendOptions): Promise<SendResult>;
  sendText(sessionId: string, to: string, text: string, options?: ContentOptions): Promise<SendResult>;
  sendImage(sessionId: string, to: string, data: Uint8Array | string, mimeType?: string, options?: ContentOptions & { caption?: string }): Promise<SendResult>;
  sendVideo(sessionId: string, to: string, data: Uint8Array | string, mimeType?: string, options?: ContentOptions & { caption?: string }): Promise<SendResult>;
  /** `voice: true` sends a voice note. */
  sendAudio(sessionId: string, to: string, data: Uint8Array | string, mimeType?: string, options?: ContentOptions & { voice?: boolean }): Promise<SendResult>;
  sendDocument(sessionId: string, to: string, data: Uint8Array | string, mimeType: string, fileName: string, options?: ContentOptions & { caption?: string }): Promise<SendResult>;
  sendSticker(sessionId: string, to: string, data: Uint8Array | string, mimeType?: string, options?: ContentOptions): Promise<SendResult>;
  sendLocation(sessionId: string, to: string, latitude: number, longitude: number, options?: ContentOptions & { name?: string; address?: string }): Promise<SendResult>;
  /** React to `messageId` ('' removes the reaction). */
  sendReaction(sessionId: string, to: string, messageId: string, emoji: string, options?: ContentOptions & { fromMe?: boolean }): Promise<SendResult>;
  /** Best effort "typing…" and co.; UNAVAILABLE when the session is not open. */
  sendPresence(sessionId: string, chat: string, presence: Presence): Promise<void>;
  /** Each message's result, or the BrokerError send() would have thrown (returned), in order. */
  sendMany(
    messages: { sessionId: string; to: string; body: string; idempotencyKey?: string }[],
    options?: Omit<SendOptions, 'idempotencyKey'>,
  ): Promise<(SendResult | BrokerError)[]>;
  watchStatus(options?: WatchOptions): StatusWatch;
  health(sessionIds?: string[], tenant?: string): Promise<SessionHealth[]>;
  /** The whole Health answer: sessions, the answering instance's engine, durability. */
  healthReport(sessionIds?: string[], tenant?: string): Promise<{
    sessions: SessionHealth[];
    durability: string;
    engine?: { name: string; up: boolean; detail: string; starts: number; since?: Timestamp };
  }>;
  createSession(sessionId: string, options?: { tenant?: string; start?: boolean }): Promise<Session>;
  getSession(sessionId: string): Promise<Session>;
  /** How far a sent message got. */
  getMessage(sessionId: string, messageId: string): Promise<MessageInfo>;
  /** The bytes of an inbound message's medium (`messageId`: its `upstreamId`). */
  downloadMedia(sessionId: string, messageId: string): Promise<Buffer>;
  listSessions(tenant?: string): Promise<Session[]>;
  getQr(sessionId: string): Promise<QrCode>;
  /** The 8-character code to type into the phone while the session is pairing. */
  requestPairingCode(sessionId: string, phoneNumber: string): Promise<string>;
  close(): void;
}

export function defaultProtoPath(): string;
export function loadBrokerPackage(protoPath?: string): unknown;
