"""Metric loggers (experiment tracking)."""
