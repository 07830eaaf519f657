"""The load-test harness (issue 7): ``python -m loadtest run --help``."""
