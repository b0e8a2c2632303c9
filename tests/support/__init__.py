"""Shared test support: fixtures (loaded as pytest plugins by tests/conftest.py), fakes and scanners."""
