"""ui package (see DESIGN.md)."""
