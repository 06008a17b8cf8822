"""Helpers for the consistency-distillation course kit (everything that is not a student task)."""
