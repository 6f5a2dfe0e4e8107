"""The test harness the tests, the benchmarks and the test bed share: fakes (`fedllm.testing.fake_vllm`, a fast fake
vLLM OpenAI worker; `fedllm.testing.hostile_worker`), factories (settings in a temp home, free ports, a tiny random
Llama), adapter exporters, virtualenvs of outside tools, a local Ray cluster and soak helpers.

Installed with the appliance (the test bed starts the fake worker) but imported by no product package.
"""
