"""Test helpers shared by unit and integration tests (tiny models, servers)."""
