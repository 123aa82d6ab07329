"""Pipeline stage: runtime."""
