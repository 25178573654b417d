# The secrets broker's Vault policy for development and test environments (the ADR's
# media-catalog-dev): every secret under media-catalog/, read, and written by rotation, so a
# secret added to the broker's config works without a policy change. Production binds
# secretbroker-prod.hcl instead: exactly the declared paths, written by
# `python -m broker vault-policy --config broker.toml`.
# Bind it to the broker's AppRole with token_no_default_policy: these are all its rights.

path "secret/data/media-catalog/*" {
  capabilities = ["read", "create", "update"]
}
path "secret/metadata/media-catalog/*" {
  capabilities = ["read"]
}

# keep its token alive
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# tell a dead token from a refused path
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# revoke a token it replaced
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
