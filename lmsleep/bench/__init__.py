"""Benchmarks behind `lmsleep bench`: one module per benchmark, each a plain `run(...) -> dict`.

    scan.py    ssm_scan ref vs chunk vs kernel, forward and forward+backward, both rules
    decode.py  per-token latency and memory while streaming long contexts, vs a growing-KV baseline
    sleep.py   cost of one sleep vs the number of passes N and the window L, vs a window's prefill
    train.py   training tokens/s and achieved FLOP/s vs this machine's matmul peak, with a profile
    common.py  runtime (a backend of common/backends.py on a device), timing, machine info, memory probes,
               tables, JSON (plots: lmsleep/plots.py)

Every `run` returns a JSON-ready document: {"bench", "backend", "quick", "machine", "settings",
"rows", "targets", ...}; the CLI prints its table and writes it. docs/BENCHMARKS.md has the numbers.
"""
