"""federation package (see DESIGN.md)."""
