// A stand-in broker for the bridge's unit tests: connects to a bridge server
// like broker/engines/baileys does, answers kv requests from a Map, and
// collects every frame.

import { connect } from 'node:net'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { readFrames, writeFrame } from '../src/wire.js'
import { createBridgeServer } from '../src/server.js'
import { makeLogger } from '../src/log.js'
import { makeFakeNetwork } from './fake-socket.js'

export const SECRET = 'test-secret-' + Math.random().toString(36).slice(2)

export async function startBridge ({ logLines = [], makeSocket, options = {}, qrIntervalMs } = {}) {
  const net = makeFakeNetwork({ qrIntervalMs })
  const path = join(mkdtempSync(join(tmpdir(), 'bridge-')), 'bridge.sock')
  const logger = makeLogger('trace', {}, line => logLines.push(line))
  const server = createBridgeServer({ secret: SECRET, makeSocket: makeSocket || net.makeSocket, options, logger })
  await new Promise(resolve => server.listen(path, resolve))
  return { net, path, server, close: () => new Promise(resolve => server.close(resolve)) }
}

/** A broker-side link: frames in `frames`, kv in `kv` (shared between links of one session). */
export function openLink (path, session, { kv = new Map(), secret = SECRET, sent = new Map(), refuseWrites = false } = {}) {
  const conn = connect(path)
  const link = { conn, frames: [], kv, ended: false, waiters: [] }
  const check = () => {
    link.waiters = link.waiters.filter(w => {
      const found = link.frames.find(w.pred)
      if (found) w.resolve(found)
      return !found
    })
  }
  link.write = frame => writeFrame(conn, frame)
  link.waitFor = (pred, ms = 5000) => new Promise((resolve, reject) => {
    const found = link.frames.find(pred)
    if (found) return resolve(found)
    const w = { pred, resolve }
    link.waiters.push(w)
    setTimeout(() => reject(new Error('timed out waiting; frames: ' + JSON.stringify(link.frames.map(f => f.t)))), ms)
  })
  link.closed = new Promise(resolve => conn.on('close', () => { link.ended = true; resolve() }))
  readFrames(conn, frame => {
    if (frame.t === 'kv_get') {
      const values = {}
      for (const k of frame.keys) if (kv.has(k)) values[k] = kv.get(k)
      link.write({ t: 'reply', rid: frame.rid, values })
      return
    }
    if (frame.t === 'kv_set') {
      if (refuseWrites && !('creds' in frame.values && kv.size === 0)) {
        link.write({ t: 'reply', rid: frame.rid, error: 'not owner' })
        return
      }
      for (const [k, v] of Object.entries(frame.values)) {
        if (v === null) kv.delete(k)
        else kv.set(k, v)
      }
      link.write({ t: 'reply', rid: frame.rid })
      return
    }
    if (frame.t === 'kv_clear') {
      kv.clear()
      link.write({ t: 'reply', rid: frame.rid })
      return
    }
    if (frame.t === 'get_message') {
      link.write({ t: 'reply', rid: frame.rid, body: sent.has(frame.id) ? sent.get(frame.id) : null })
      return
    }
    link.frames.push(frame)
    check()
  }, () => {})
  conn.on('error', () => {})
  conn.on('connect', () => link.write({ t: 'hello', version: 1, secret, session }))
  return link
}

/** A paired session's kv: pair once through QR, return the kv. */
export async function pairedKv (bridge, session, phone = '15550001') {
  const kv = new Map()
  const link = openLink(bridge.path, session, { kv })
  await link.waitFor(f => f.t === 'qr')
  await bridge.net.control({ action: 'scan', session, phone })
  await link.waitFor(f => f.t === 'close')
  await link.closed
  return kv
}
