"""Aggregation: the pure maths over adapter updates, the round accumulators, the strategies (their interface, wrappers
and factory), LoRA-aware aggregation, bounds, differential privacy and secure aggregation."""
