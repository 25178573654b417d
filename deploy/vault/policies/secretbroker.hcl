# Policy of the secrets broker's AppRole: least privilege.
# Read the declared KV v2 secrets and their metadata (versions, for WatchSecrets), write new
# versions of the rotating ones only, and keep its own token alive. The role is created with
# token_no_default_policy, so these are all its rights.
# Keep this list equal to the [secrets] of deploy/broker.example.toml.

path "secret/data/media-catalog/database" {
  capabilities = ["read"]
}

# Rotating (rotation.key = "jwt_secret"): the broker writes new versions, with check-and-set.
path "secret/data/media-catalog/api" {
  capabilities = ["read", "create", "update"]
}

path "secret/data/media-catalog/external" {
  capabilities = ["read"]
}

path "secret/metadata/media-catalog/database" {
  capabilities = ["read"]
}

path "secret/metadata/media-catalog/api" {
  capabilities = ["read"]
}

path "secret/metadata/media-catalog/external" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# A replaced token (renewal refused, max TTL near, found dead) is revoked, so logins never
# leave live tokens behind.
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
