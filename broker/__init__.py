"""The secrets broker: the only holder of Vault credentials, serving secrets over mutual TLS."""
