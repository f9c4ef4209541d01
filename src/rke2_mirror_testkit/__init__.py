"""Test infrastructure: throw-away PKI, real docker-registry processes, a Harbor-like
token service / front proxy and a deterministic test-image builder.

Only used by the test-suite (needs the ``[test]`` extras: cryptography, bcrypt).
Everything listens on 127.0.0.1 only.
"""
