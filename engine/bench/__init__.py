"""The benchmark harness: `python -m engine bench` (see engine/bench/runner.py for what it measures).

Modules: `runner` (the sections, the record, the table), `systems` (Cachet, plain transformers,
llama.cpp behind one interface), `workload` (the fixed prompts and conversations), `record` (figures
and the JSON schema), `machine` (where it ran, memory bandwidth), `shapes` (random-weight models of
published shapes for GPU timing), `plots` (matplotlib).
"""
