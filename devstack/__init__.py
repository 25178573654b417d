"""The local stack: a real OpenBao dev server, bootstrapped like production, plus dev certificates.

The tests use the same pieces, so the dev stack and the test fixtures cannot drift apart.
"""
