# The secrets broker's Vault policy, least privilege: written by
# `python -m broker vault-policy --config broker.toml` from the broker's [secrets].
# Bind it to the broker's AppRole with token_no_default_policy: these are all its rights.

# media-catalog/api: rotates key 'jwt_secret' (check-and-set writes)
path "secret/data/media-catalog/api" {
  capabilities = ["read", "create", "update"]
}
path "secret/metadata/media-catalog/api" {
  capabilities = ["read"]
}

# media-catalog/database: reads
path "secret/data/media-catalog/database" {
  capabilities = ["read"]
}
path "secret/metadata/media-catalog/database" {
  capabilities = ["read"]
}

# media-catalog/external: reads
path "secret/data/media-catalog/external" {
  capabilities = ["read"]
}
path "secret/metadata/media-catalog/external" {
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
