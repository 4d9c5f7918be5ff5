"""Config files (YAML, one per task and dataset) and their schema (configs/schema.py)."""
