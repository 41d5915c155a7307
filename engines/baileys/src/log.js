// The bridge's logger, in the shape Baileys expects of pino (level, child,
// trace..fatal). It prints the message string only, never the objects
// Baileys attaches to it: those can hold stanzas, credentials or keys, and
// key material must never reach a log.

const LEVELS = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: 100 }

export function makeLogger (level = 'warn', bindings = {}, write = line => process.stderr.write(line)) {
  const threshold = LEVELS[level] ?? LEVELS.warn
  const emit = (name) => (objOrMsg, maybeMsg) => {
    if (LEVELS[name] < threshold) return
    let msg = typeof objOrMsg === 'string' ? objOrMsg : maybeMsg
    if (typeof msg !== 'string') msg = ''
    const where = bindings.session ? ` session=${bindings.session}` : ''
    write(`bridge ${name}${where}: ${msg.slice(0, 300)}\n`)
  }
  const logger = {
    level,
    child: (more) => makeLogger(level, { ...bindings, ...(more && more.session ? { session: more.session } : {}) }, write)
  }
  for (const name of ['trace', 'debug', 'info', 'warn', 'error', 'fatal']) logger[name] = emit(name)
  return logger
}
