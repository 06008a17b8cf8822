"""Grading side of the course kit (instructors only)."""
