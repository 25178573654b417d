"""The audit trail: one record per decision, written off the request path, linked into a keyed hash
chain."""
