"""Commands only the CLI runs: ops calls to running replicas, migration into Vault, the Vault
policy printer."""
