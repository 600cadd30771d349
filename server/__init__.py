"""The coordinator: ServerApp, secure-aggregation workflow, aggregation, checkpoints, evaluation, reports."""
