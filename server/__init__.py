"""The coordinator: ServerApp, aggregation, checkpoints, merge, serving."""
