"""Expected GPU memory per process for LoRA on Llama-3-8B and -70B under DDP and FSDP2, with and
without an NF4 base: arithmetic from the architectures, not a measurement.

    python benchmarks/distributed_memory.py [--tokens 4096] [--rank 8]

Assumptions (stated in docs/distributed.md next to the table):
- base weights bf16 (2 bytes); NF4 = 4 bits + one 8-bit scale per 64 weights + one fp32 scale per
  64 x 256 (double quantization, leantune/quant.py) on the decoder's linear weights, embeddings and
  head stay bf16;
- LoRA r on q, v, o and the three MLP projections (torchtune's Llama-3 LoRA recipe), adapter tensors
  fp32: weight + gradient + two AdamW moments = 16 bytes per trainable parameter;
- activations for `--tokens` tokens per process (e.g. 2 x 2048) with activation checkpointing: each
  decoder layer's bf16 input kept, one layer's tensors saved for backward while it recomputes
  (7 h + 2 kv + 4 intermediate values per token; flash attention keeps no T x T scores), and two
  chunks of the chunked loss (256 tokens x vocabulary, fp32);
- FSDP2 over N processes: weights, gradients and optimizer state / N, plus the gathered root unit
  (embeddings, head, final norm: gathered for the whole forward and backward, since the chunked loss
  reads the head's weight) and two gathered decoder blocks (the one computing, the one prefetched).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2 ** 30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAPTER_BYTES = 4 + 4 + 8  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
CHUNK_TOKENS = 256


@dataclass
class Llama:
    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}

    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def root_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden  # untied embeddings and head, final norm

    def lora_params(self, r: int) -> int:
        per_layer = sum(r * (a + b) for name, (a, b) in self.linears().items() if name != "k")
        return per_layer * self.layers


MODELS = [Llama("Llama-3-8B", 4096, 14336, 32, 1024, 128256), Llama("Llama-3-70B", 8192, 28672, 80, 1024, 128256)]


def activations(model: Llama, tokens: int) -> float:
    boundaries = model.layers * tokens * model.hidden * 2
    one_layer = tokens * (7 * model.hidden + 2 * model.kv_dim + 4 * model.intermediate) * 2
    loss_chunks = 2 * CHUNK_TOKENS * model.vocab * 4
    return boundaries + one_layer + loss_chunks


def per_process(model: Llama, mode: str, processes: int, nf4: bool, tokens: int, r: int) -> float:
    linear_bytes = NF4_BYTES if nf4 else 2
    block = model.block_params() * linear_bytes
    weights = model.layers * block + model.root_params() * 2
    adapter = model.lora_params(r) * ADAPTER_BYTES
    if mode == "ddp":
        return weights + adapter + activations(model, tokens)
    gathered = model.root_params() * 2 * (processes - 1) / processes + 2 * model.block_params() * 2
    return (weights + adapter) / processes + gathered + activations(model, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per process per micro-batch")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    print(f"| model | trainable (LoRA r={args.rank}) | DDP, bf16 | DDP, NF4 | FSDP2 x2 | FSDP2 x4 | FSDP2 x8 |")
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        cells = [per_process(model, "ddp", 1, False, args.tokens, args.rank),
                 per_process(model, "ddp", 1, True, args.tokens, args.rank)]
        cells += [per_process(model, "fsdp", n, False, args.tokens, args.rank) for n in (2, 4, 8)]
        total = model.layers * model.block_params() + model.root_params()
        print(f"| {model.name} ({total / 1e9:.2f} B) | {model.lora_params(args.rank) / 1e6:.1f} M | "
              + " | ".join(f"{c / GIB:.1f} GiB" for c in cells) + " |")


if __name__ == "__main__":
    main()
