"""`leantune bench`: step time, memory, bytes saved for backward and longest sequence, per method.

rows     what each row runs (floor, leantune methods by name, Hugging Face PEFT)
worker   one configuration in a fresh process (python -m leantune.bench.worker)
measure  bytes saved for backward, resident memory, timers
profile  one step under torch.profiler, grouped into matmuls, elementwise, optimizer, ...
search   the longest sequence under a memory cap (exponential search + bisection)
runner   interleaved repeats, aggregation, ratios to PEFT LoRA and the floor
report   results.json, results.md, chart.png, profile.md
"""
