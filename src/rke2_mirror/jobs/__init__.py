"""The use cases, each wiring endpoints to the engine: mirror, save, load, inspect, sync.  No typer, no
printing: the CLI passes progress callbacks, a log callback and a cancel token."""
