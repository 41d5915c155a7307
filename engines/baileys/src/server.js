// The bridge's listener: one connection per session link, each opened with a
// hello that carries the per-start secret. Many sessions share the process;
// none shares state with another.

import { createServer } from 'node:net'
import { timingSafeEqual, createHash } from 'node:crypto'
import { readFrames, writeFrame } from './wire.js'
import { BridgeSession } from './session.js'

export const PROTOCOL_VERSION = 1

const HELLO_TIMEOUT_MS = 10_000

const digest = text => createHash('sha256').update(String(text)).digest()

/** Same secret? Compared in constant time, never logged. */
export function secretMatches (expected, given) {
  return typeof given === 'string' && timingSafeEqual(digest(expected), digest(given))
}

/**
 * A net.Server running sessions for authenticated connections.
 * @param {object} o
 * @param {string} o.secret  the per-start secret every hello must carry
 * @param {(config: object) => object} o.makeSocket  the socket factory (makeWASocket or a fake)
 * @param {object} o.options  socket options for every session ({version, waWebSocketUrl})
 * @param {object} o.logger
 */
export function createBridgeServer ({ secret, makeSocket, options, logger }) {
  const sessions = new Set()
  const server = createServer(conn => {
    let session = null
    const write = frame => writeFrame(conn, frame)
    const helloTimer = setTimeout(() => conn.destroy(), HELLO_TIMEOUT_MS)
    const refuse = reason => {
      write({ t: 'error', reason })
      conn.end()
    }
    readFrames(conn, frame => {
      if (session) {
        session.onFrame(frame)
        return
      }
      clearTimeout(helloTimer)
      if (frame.t !== 'hello' || !secretMatches(secret, frame.secret)) {
        refuse('bad hello: wrong secret or not a hello')
        return
      }
      if (frame.version !== PROTOCOL_VERSION) {
        refuse(`protocol version ${frame.version} not supported (bridge speaks ${PROTOCOL_VERSION})`)
        return
      }
      if (typeof frame.session !== 'string' || !frame.session) {
        refuse('bad hello: no session')
        return
      }
      session = new BridgeSession({
        sessionId: frame.session,
        write,
        done: () => conn.end(),
        makeSocket,
        options,
        logger: logger.child({ session: frame.session })
      })
      sessions.add(session)
      write({ t: 'welcome', version: PROTOCOL_VERSION })
      session.start().catch(err => session.end({ t: 'close', code: 428, reason: `bridge could not start the session: ${err.message}` }))
    }, reason => {
      if (session) session.end({ t: 'close', code: 428, reason })
      else refuse(reason)
    })
    conn.on('close', () => {
      clearTimeout(helloTimer)
      if (session) {
        session.end(null) // the broker left: the WhatsApp socket goes with it
        sessions.delete(session)
      }
    })
    conn.on('error', () => {}) // 'close' follows
  })
  server.sessions = sessions
  return server
}
