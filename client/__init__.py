"""The node: ClientApp, local data, DP trainer, privacy accountant, ledger."""
