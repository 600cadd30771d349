"""What both the coordinator and the nodes need: config, models, adapters, ledger."""
