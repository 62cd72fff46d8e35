"""Per-operation cost of one sketched linear on this CPU: the products against the rebuild of Ŵ
and the table scatter, plus two other ways to rebuild Ŵ that were tried and measured slower.

    python benchmarks/sketch_layer_ops.py   (quotes in benchmarks/sketchtune.md)
"""
import time

import torch
import torch.nn.functional as F

from leantune.methods.sketch.pack import pack_codes, rebuild_weight, unpack_codes

LOW, HIGH = torch.arange(256) & 15, torch.arange(256) >> 4


def milliseconds(fn, repeats=30):
    fn(), fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def byte_pair_lookup(packed, tables):
    """Ŵ from a per-row table over all 256 code pairs (each entry two float32s read as one float64)."""
    out, groups, _ = tables.shape
    pairs = torch.stack((tables[..., LOW], tables[..., HIGH]), -1).reshape(out, groups, 512).view(torch.float64)
    return pairs.gather(2, packed.view(out, groups, -1).long()).view(torch.float32).view(out, -1)


def int32_embedding(packed, tables):
    """Ŵ from an embedding lookup with int32 indices (row offset + code) instead of int64 ones."""
    out, groups, entries = tables.shape
    offsets = (torch.arange(out * groups, dtype=torch.int32) * entries).view(out, groups, 1)
    index = unpack_codes(packed).view(out, groups, -1).int() + offsets
    return F.embedding(index.view(-1), tables.view(-1, 1)).view(out, -1)


def main(out=1536, inp=576, tokens=1024):
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (out, inp))
    packed, tables = pack_codes(codes), torch.randn(out, 1, 16)
    x, g, weight = torch.randn(tokens, inp), torch.randn(tokens, out), torch.randn(out, inp)
    grad_weight, index = g.t() @ x, codes.view(out, 1, -1)
    current = rebuild_weight(unpack_codes(packed).long(), tables)
    for alternative in (byte_pair_lookup, int32_embedding):
        assert torch.equal(alternative(packed, tables), current)
    results = {
        "forward product x Wᵀ": milliseconds(lambda: x @ weight.t()),
        "weight gradient Gᵀ X": milliseconds(lambda: g.t() @ x),
        "rebuild Ŵ (unpack + gather, as used)": milliseconds(lambda: rebuild_weight(unpack_codes(packed).long(), tables)),
        "table scatter-add": milliseconds(lambda: torch.zeros_like(tables).scatter_add_(2, index, grad_weight.view(out, 1, -1))),
        "rebuild Ŵ by byte-pair lookup": milliseconds(lambda: byte_pair_lookup(packed, tables)),
        "rebuild Ŵ by int32 embedding": milliseconds(lambda: int32_embedding(packed, tables)),
    }
    print(f"{out} x {inp} linear, {tokens} tokens, {torch.get_num_threads()} threads")
    for name, value in results.items():
        print(f"  {name:<40} {value:6.2f} ms")


if __name__ == "__main__":
    main()
