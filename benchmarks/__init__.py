"""Benchmark scripts run by the maintainers (not part of the installed library)."""
