"""Shared test helpers: a scripted loopback upstream and an in-process sidecar."""
