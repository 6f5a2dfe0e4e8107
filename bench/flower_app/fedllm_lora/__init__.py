"""Federated LoRA on Flower: the ServerApp (plain FedAvg) and ClientApp (peft LoRA, AdamW at a constant rate)."""
