"""The package version: equal to the snakepit crates' (checked by a test in snakepit-adapters)."""

__version__ = "0.1.0"
