"""Fault-test fixtures: the scale-out fixtures (real Redis, real broker processes)."""

from tests.cluster.conftest import broker_processes, credential_env  # noqa: F401
from tests.redis_server import redis_server  # noqa: F401
