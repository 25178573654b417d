"""How the broker is watched: metrics, the HTTP endpoints for probes and scrapes, readiness, and
logs."""
