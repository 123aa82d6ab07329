"""Pipeline stage: validate."""
