"""Shared state across replicas: the Redis client, the GCRA lease math and the idempotency record stores."""
