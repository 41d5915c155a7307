// Newline-delimited JSON frames over one stream (docs/bridge-protocol.md).
// One frame per line; a line longer than MAX_LINE ends the connection, so a
// broken peer cannot make the bridge buffer without bound.

// A send frame may carry a medium of up to 64 MiB (the cap of the broker's
// --max-media-bytes) as base64, plus the frame around it.
export const MAX_LINE = 96 * 1024 * 1024

/** Calls onFrame(obj) for every complete line of `stream`; onBad(reason) once on garbage. */
export function readFrames (stream, onFrame, onBad) {
  // The parts of the line being read: a newline is looked for in each new chunk
  // only, so a large line costs its length once, not once per chunk.
  let parts = []
  let length = 0
  let bad = false
  stream.setEncoding('utf8')
  stream.on('data', chunk => {
    if (bad) return
    let start = 0
    let nl
    while ((nl = chunk.indexOf('\n', start)) >= 0) {
      parts.push(chunk.slice(start, nl))
      const line = parts.length === 1 ? parts[0] : parts.join('')
      parts = []
      length = 0
      start = nl + 1
      if (!line) continue
      let frame
      try {
        frame = JSON.parse(line)
      } catch {
        bad = true
        onBad('bad frame: not JSON')
        return
      }
      if (frame === null || typeof frame !== 'object' || typeof frame.t !== 'string') {
        bad = true
        onBad('bad frame: no type')
        return
      }
      onFrame(frame)
    }
    if (start < chunk.length) {
      parts.push(chunk.slice(start))
      length += chunk.length - start
    }
    if (length > MAX_LINE) {
      bad = true
      onBad('bad frame: too long')
    }
  })
}

/** Writes one frame; false once the stream is gone (the caller's reader reports the end). */
export function writeFrame (stream, frame) {
  if (stream.destroyed || stream.writableEnded) return false
  stream.write(JSON.stringify(frame) + '\n')
  return true
}
