"""Datasets: JSONL prompt/completion and chat formats, plain text, and the built-in HumanEval unit-test pairs."""
