"""FedLLM Appliance: federated LoRA fine-tuning and OpenAI-compatible serving in one package.

`fedllm.core` (settings, model store, adapter registry, errors) is the base every package
imports; `fedllm.appliance.cli` and `fedllm.appliance.launcher` are the top that nothing imports.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
