"""The Tinker-compatible HTTP service."""
