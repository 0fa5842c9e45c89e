"""Helpers shared by test modules (import from here, not from another test module)."""
