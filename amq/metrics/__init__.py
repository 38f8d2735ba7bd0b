"""Quality metrics a configuration is scored by (lower is better)."""
