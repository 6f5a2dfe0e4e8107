"""Cross-silo federated LoRA (see docs/CONTRACTS.md), in five sub-packages to import from.

    fedllm.federation.wire          the message format: protocol, payload (encode_payload / decode_payload), frames,
                             codec, compression, the ZeroMQ transport, CURVE keys
    fedllm.federation.aggregation   the maths and the strategies: aggregate, accumulators, server_strategies,
                             strategy_wrappers, strategy_factory (make_strategy), strategies (their public names),
                             lora_aggregate, bounds, privacy, secagg, secure_round, update_spool
    fedllm.federation.runtime       the running federation: coordinator (Coordinator) with sessions, round_runner,
                             recorder and status_server; silo (SiloClient, SiloTrainer, EngineTrainer), service
                             (build_strategy, run_coordinator, run_silo), checkpoint, runs, timing, rank_group, ...
    fedllm.federation.publishing    the router publisher, the promotion gate, the resume after a held-back round
    fedllm.federation.demo          `appliance demo federation` (demo.run_demo), its data, simulated silos

`import federation` imports nothing else (no torch, no zmq): the base install has neither.
"""
