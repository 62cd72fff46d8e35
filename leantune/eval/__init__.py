"""Evaluation: loss and perplexity, generation, sandboxed execution of generated unit tests."""
