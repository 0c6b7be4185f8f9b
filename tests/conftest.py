"""Shared fixtures live in tests/fixtures/, one module per kind of service."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.models",
    "tests.fixtures.engines",
    "tests.fixtures.documents",
    "tests.fixtures.rag",
]
