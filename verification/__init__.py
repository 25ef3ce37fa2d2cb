"""Verification tree: property-based checks of snopt against exact references (DESIGN.md §5)."""
