"""CLI command modules. Each exposes `register(app)` that adds its commands to the root Typer app."""
