"""Persistence building blocks: the one schema, the event store, engines and migrations."""
