"""serve package (see DESIGN.md)."""
