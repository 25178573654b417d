"""The gRPC surface: the two services, the per-call plumbing every handler shares, and the one
table from domain errors to status codes."""
