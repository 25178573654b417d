"""The secrets broker: the only holder of Vault credentials, serving secrets over mutual TLS.

The folders are the layers; each imports only those below it (tests/test_architecture.py):

    cli.py, server.py     entry point; assembly of the parts and their lifecycle
    heap.py               the garbage collector kept off open streams' objects
    api/                  the gRPC surface: handlers, the per-call plumbing, the status table
    core/                 the decisions: policy, resolution, cache, watches, rollback, rotation
    observe/              metrics, probes, readiness, logs (watching the broker, not serving it)
    audit/                the audit trail and its keyed hash chain
    security/             who is calling (certificate identity) and the server's TLS files
    sources/              Vault (KV v2, a node set, a login) and environment variables
    tools/                ops, migration and policy commands: only the CLI imports them
    config.py, errors.py, names.py, lru.py   what every layer shares
    config_loader.py, config_reader.py       the config file and settings variables, read

One GetSecret, from the wire to Vault and back:

1. ``api/calls.py``: the plumbing ``add_servicer`` put around the handler: the drain gate,
   metrics, the caller's identity from its certificate (``security/identity.py``), and the
   request parsed.
2. ``api/service.py`` ``SecretBrokerService.GetSecret``: the handler, the decision alone.
3. ``core/reader.py`` ``SecretReader.read``: the name validated (``names.py``), the policy
   (``core/policy.py``: deny by default) before the declared secrets; a fresh cached value
   is returned here, without an await.
4. ``core/resolver.py`` ``SecretResolver.get``: Vault or env, by the rollback state
   (``core/rollback.py``); the version window.
5. ``core/cache.py`` ``SecretCache.get``: TTL, one read per secret in flight,
   stale-while-revalidate and stale-if-error; the read runs on the Vault I/O pool.
6. ``sources/vault.py`` ``VaultSource.read`` -> ``sources/vault_session.py`` (the token) ->
   ``sources/vault_nodes.py`` (which node, the call budget) -> hvac; hvac's errors become the
   broker's in ``sources/vault_errors.py``.

Back up: the value is cached, the handler queues its audit record (``audit/trail.py``),
and the answer is built once per value (``api/service.py`` ``ResponseCache``). A
``BrokerError`` raised anywhere on the way becomes a refusal record and a status code in
``api/calls.py``, through the one table in ``api/status.py``.
"""
