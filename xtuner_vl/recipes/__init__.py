"""Entry recipes (train, check-data, ...) composed from the package's components."""
