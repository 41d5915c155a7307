// The bridge process. Started by the broker (broker/engines/baileys), never by
// hand: it reads one JSON line of start settings on stdin (the per-start
// secret among them, so it is never in argv, the environment or a log),
// listens on the Unix socket it names, prints one "ready" line on stdout, and
// exits when stdin closes, which is when the broker that started it is gone.

import { createInterface } from 'node:readline'
import { makeLogger } from './log.js'
import { createBridgeServer } from './server.js'

async function socketFactory () {
  const fake = process.env.BROKER_BRIDGE_FAKE_SOCKET
  if (fake) {
    // Tests only: a scripted stand-in for WhatsApp (test/fake-socket.js).
    const { makeFakeNetwork } = await import('../test/fake-socket.js')
    const network = makeFakeNetwork()
    await network.serveControl(fake)
    return network.makeSocket
  }
  const { makeWASocket } = await import('baileys')
  return makeWASocket
}

function readStart () {
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: process.stdin })
    lines.once('line', line => {
      try {
        resolve(JSON.parse(line))
      } catch {
        reject(new Error('bad start settings on stdin'))
      }
    })
    process.stdin.once('end', () => reject(new Error('no start settings on stdin')))
  })
}

async function main () {
  const start = await readStart()
  process.stdin.on('end', () => process.exit(0))
  process.stdin.resume()
  const logger = makeLogger(start.log_level || 'warn')
  const options = {}
  if (Array.isArray(start.wa_version)) options.version = start.wa_version
  if (start.ws_url) options.waWebSocketUrl = start.ws_url
  if (Number.isInteger(start.max_media_bytes) && start.max_media_bytes > 0) options.maxMediaBytes = start.max_media_bytes
  const makeSocket = await socketFactory()
  const server = createBridgeServer({ secret: start.secret, makeSocket, options, logger })
  server.listen(start.socket_path, () => {
    process.stdout.write(JSON.stringify({ t: 'ready', pid: process.pid }) + '\n')
  })
  server.on('error', err => {
    process.stderr.write(`bridge error: cannot listen: ${err.message}\n`)
    process.exit(2)
  })
}

main().catch(err => {
  process.stderr.write(`bridge error: ${err.message}\n`)
  process.exit(2)
})
