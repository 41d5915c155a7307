'use strict';
/** Node.js client for the session broker (broker.v1). See README.md. */

const { BrokerClient, StatusWatch, DEFAULT_TARGET, loadBrokerPackage, defaultProtoPath } =
  require('./lib/client');
const { BrokerError, DOMAIN, ErrorReason } = require('./lib/errors');
const { status } = require('@grpc/grpc-js');

module.exports = {
  BrokerClient,
  StatusWatch,
  BrokerError,
  DOMAIN,
  ErrorReason,
  DEFAULT_TARGET,
  loadBrokerPackage,
  defaultProtoPath,
  status,
};
