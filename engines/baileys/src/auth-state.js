// Baileys' auth state, kept in the broker's store instead of on disk.
//
// `kv` is the session's key-value area on the broker (get(keys), set(values),
// both async, values are BufferJSON text). Creds live under `creds`, each
// signal key under `<type>:<id>`. Reads go to the broker on connect and on a
// cache miss; every write goes through to the broker before Baileys goes on,
// so the broker (which fences the write with the owner's lease) always holds
// what WhatsApp believes. Caching is Baileys' own makeCacheableSignalKeyStore;
// the transactions are the ones makeWASocket adds itself.

import { BufferJSON, initAuthCreds, makeCacheableSignalKeyStore, proto } from 'baileys'

export const CREDS_KEY = 'creds'

export const keyName = (type, id) => `${type}:${id}`

const encode = value => JSON.stringify(value, BufferJSON.replacer)

function decode (type, text) {
  const value = JSON.parse(text, BufferJSON.reviver)
  // As useMultiFileAuthState does: this type must be a protobuf object again.
  return type === 'app-state-sync-key' ? proto.Message.AppStateSyncKeyData.fromObject(value) : value
}

/** The raw signal key store over `kv` (no cache). */
export function kvKeyStore (kv) {
  return {
    async get (type, ids) {
      const names = ids.map(id => keyName(type, id))
      const found = names.length ? await kv.get(names) : {}
      const out = {}
      for (const id of ids) {
        const text = found[keyName(type, id)]
        if (text != null) out[id] = decode(type, text)
      }
      return out
    },
    async set (data) {
      const values = {}
      for (const type in data) {
        for (const id in data[type]) {
          const value = data[type][id]
          values[keyName(type, id)] = value == null ? null : encode(value)
        }
      }
      if (Object.keys(values).length) await kv.set(values)
    },
    async clear () {
      await kv.clear()
    }
  }
}

/**
 * {state, saveCreds, fresh}: `state` for makeWASocket's `auth`; `saveCreds`
 * writes the creds through (call it on every creds.update); `fresh` when no
 * creds were stored (a new login: they are stored at once, so a QR shown
 * from them stays valid across a bridge restart).
 */
export async function kvAuthState (kv, logger) {
  const stored = await kv.get([CREDS_KEY])
  const text = stored[CREDS_KEY]
  const fresh = text == null
  const creds = fresh ? initAuthCreds() : JSON.parse(text, BufferJSON.reviver)
  const saveCreds = () => kv.set({ [CREDS_KEY]: encode(creds) })
  if (fresh) await saveCreds()
  return {
    state: { creds, keys: makeCacheableSignalKeyStore(kvKeyStore(kv), logger) },
    saveCreds,
    fresh
  }
}
