"""Where secret values come from: Vault (KV v2) now, environment variables for rollback."""
