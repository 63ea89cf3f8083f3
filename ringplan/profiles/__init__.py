"""Profiles: one envelope (schema, provenance, validation, atomic merged write) and the row types of each kind."""
