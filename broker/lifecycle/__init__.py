"""The session lifecycle as a pure state machine: events in, actions out, no I/O."""
