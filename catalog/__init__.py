"""The Media Catalog's side of the broker: a client, and Config read through it.

The catalog holds no Vault credential; it proves who it is with its client certificate.
"""
