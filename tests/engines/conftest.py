"""Fixtures of the engine tests: a real Redis, a credential key, broker processes."""

from tests.cluster.conftest import broker_processes, credential_env  # noqa: F401
from tests.redis_server import redis_server, shared_redis_server  # noqa: F401
