"""Serving benchmark: workloads, a light streaming load client, and its report (`kvserve bench`).

corpus.py     English prose and templates the workloads compose (deterministic from a seed)
workloads.py  BenchRequest lists: shared-system-prompt, document-qa, multi-turn, agent-loop, no-sharing, traces
client.py     one-process asyncio client streaming from any OpenAI-compatible endpoint
report.py     percentiles, throughput, prefix-cache hit rate, JSON and table
command.py    the `kvserve bench` subcommand
"""
