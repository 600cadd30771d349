"""What several test modules share: dialogue files (data), privacy ledgers (ledger), child processes
(processes), the deploy kit's files (deploy_files) and the runbook runner (runbooks). Fixtures stay in
tests/conftest.py."""
