"""Test doubles the tests and the benchmarks share; not part of the installed product (see pyproject's packages).

`testing.fake_vllm` is a fast fake vLLM OpenAI worker.
"""
