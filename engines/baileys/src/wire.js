// Newline-delimited JSON frames over one stream (docs/bridge-protocol.md).
// One frame per line; a line longer than MAX_LINE ends the connection, so a
// broken peer cannot make the bridge buffer without bound.

export const MAX_LINE = 8 * 1024 * 1024

/** Calls onFrame(obj) for every complete line of `stream`; onBad(reason) once on garbage. */
export function readFrames (stream, onFrame, onBad) {
  let buffered = ''
  stream.setEncoding('utf8')
  stream.on('data', chunk => {
    buffered += chunk
    let nl
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl)
      buffered = buffered.slice(nl + 1)
      if (!line) continue
      let frame
      try {
        frame = JSON.parse(line)
      } catch {
        onBad('bad frame: not JSON')
        return
      }
      if (frame === null || typeof frame !== 'object' || typeof frame.t !== 'string') {
        onBad('bad frame: no type')
        return
      }
      onFrame(frame)
    }
    if (buffered.length > MAX_LINE) onBad('bad frame: too long')
  })
}

/** Writes one frame; false once the stream is gone (the caller's reader reports the end). */
export function writeFrame (stream, frame) {
  if (stream.destroyed || stream.writableEnded) return false
  stream.write(JSON.stringify(frame) + '\n')
  return true
}
