"""What an auditor runs: the ledger audit, canaries and the one-run bound on epsilon.

None of it runs on a node or in the coordinator's ServerApp, so none of it is in the app bundle a
node operator approves; it reads what they produce (ledgers, a model, a report).
"""
