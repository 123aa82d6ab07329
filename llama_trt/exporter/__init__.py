"""Pipeline stage: exporter."""
