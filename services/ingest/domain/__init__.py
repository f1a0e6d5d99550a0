"""The ingest service's own rules: who may be enrolled, which events are acceptable. Pure, no I/O."""
