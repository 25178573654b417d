"""What the broker decides: who may read what, which source serves a secret, the cache and its
staleness rules, watches, rollback and rotation."""
