// What a Baileys `connection.update` close means, as the broker's disconnect
// code and a reason text. Baileys puts the code in
// lastDisconnect.error.output.statusCode (a Boom error); the broker's
// lifecycle table decides what each code does, not the bridge.

import { DisconnectReason } from 'baileys'

const TEXT = {
  [DisconnectReason.loggedOut]: 'logged out',
  [DisconnectReason.forbidden]: 'forbidden (the number may be banned)',
  [DisconnectReason.timedOut]: 'timed out',
  [DisconnectReason.connectionClosed]: 'connection closed',
  [DisconnectReason.connectionReplaced]: 'replaced by another connection',
  [DisconnectReason.badSession]: 'bad session',
  [DisconnectReason.unavailableService]: 'service unavailable',
  [DisconnectReason.restartRequired]: 'restart required',
  [DisconnectReason.multideviceMismatch]: 'multi-device mismatch',
  405: 'client outdated: WhatsApp rejected this web version'
}

/** {code, reason} of a close; an error without a status code counts as a lost connection (428). */
export function closeReason (lastDisconnect) {
  const error = lastDisconnect && lastDisconnect.error
  const status = error && error.output && error.output.statusCode
  const code = Number.isInteger(status) ? status : DisconnectReason.connectionClosed
  const message = error && typeof error.message === 'string' ? error.message : ''
  const known = TEXT[code] || 'connection closed'
  const reason = message && message !== known ? `${known}: ${message.slice(0, 200)}` : known
  return { code, reason }
}
