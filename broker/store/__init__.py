"""Where sessions, credentials, outboxes and events live: memory (default) or Redis."""
