"""The contracts between packages, as docs/CONTRACTS.md describes them: the router's client and metric names,
the record validator, run tracking, adapter lineage and the gate log."""
