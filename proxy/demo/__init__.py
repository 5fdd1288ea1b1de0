"""The demo: a flaky upstream and a runner that compares direct vs sidecar calls."""
