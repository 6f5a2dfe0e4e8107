"""One module per console tab; each has `build(ctx)` that lays out its components and wires its events."""
