'use strict';
// lib/reasons.js is generated from the proto by scripts/gen_proto.py (the
// package does not ship the proto, so it cannot load it at run time); this
// checks it against the proto itself, so a reason added there cannot be
// missing here even when the generator was not run.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const protobuf = require('protobufjs');

const { ErrorReason, defaultProtoPath } = require('..');

test('ErrorReason names exactly the proto enum values, each as its wire string', () => {
  const root = new protobuf.Root().loadSync(defaultProtoPath(), { keepCase: true });
  const names = Object.keys(root.lookupEnum('broker.v1.ErrorReason.Reason').values);
  assert.deepEqual(Object.keys(ErrorReason), names);
  for (const name of names) assert.equal(ErrorReason[name], name);
  assert.ok(Object.isFrozen(ErrorReason));
});
