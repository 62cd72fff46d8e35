"""PaCA vs the floor vs Hugging Face PEFT LoRA: step time, bytes saved for backward, peak memory.

    python benchmarks/paca_step.py [--rounds 7] [--batch 4] [--seq 256] [--rows floor,paca,peft-lora]
    python benchmarks/paca_step.py --profile paca        # torch.profiler table of one step

Timing runs every row in one process and interleaves their steps (round-robin, rotating the
order), so load from other processes on a shared machine hits all rows alike; the medians are
reported. Peak memory is measured per row in a fresh subprocess (resident-set high-water mark
over two steps, after the model is loaded). The floor is the frozen model: forward plus input
gradients only (the embeddings' output requires grad), same loss, no optimizer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import leantune as lt
from leantune.loss import causal_lm_loss

ROWS = {
    "floor": None,
    "paca": {"name": "paca", "r": 16, "alpha": 32},
    "qpaca": {"name": "paca", "r": 16, "alpha": 32, "quantize": "nf4"},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "qlora": {"name": "lora", "r": 8, "alpha": 16, "quantize": "nf4"},
    "peft-lora": "peft",
}


def build(row: str, model_name: str):
    model = lt.load_model(model_name)
    spec = ROWS[row]
    if spec is None:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    elif spec == "peft":
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    else:
        from leantune.methods import config_from_dict

        lt.attach(model, config_from_dict(dict(spec)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if spec is not None else None
    return model, optimizer


def make_step(model, optimizer, ids):
    def step():
        loss = causal_lm_loss(model, ids, ids)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def saved_bytes(model, step) -> int:
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_rss_of(row: str, args) -> dict[str, int]:
    """High-water mark of resident memory over two steps, in a fresh process, minus the loaded model."""
    code = f"""
import sys, torch
sys.path.insert(0, 'benchmarks')
import paca_step as b
model, opt = b.build({row!r}, {args.model!r})
ids = torch.randint(0, model.config.vocab_size, ({args.batch}, {args.seq}), generator=torch.Generator().manual_seed(0))
step = b.make_step(model, opt, ids)
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
base = rss('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
step(); step()
print(rss('VmHWM') - base, rss('VmHWM'))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    above, total = out.stdout.strip().splitlines()[-1].split()
    return {"peak_rss_above_model_bytes": int(above), "peak_rss_bytes": int(total)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="floor,paca,peft-lora")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", metavar="ROW")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)

    if args.profile:
        model, optimizer = build(args.profile, args.model)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
        step = make_step(model, optimizer, ids)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    rows = args.rows.split(",")
    built = {row: build(row, args.model) for row in rows}
    ids = torch.randint(0, built[rows[0]][0].config.vocab_size, (args.batch, args.seq), generator=generator)
    steps = {row: make_step(model, opt, ids) for row, (model, opt) in built.items()}
    result = {row: {"saved_bytes": saved_bytes(built[row][0], steps[row])} for row in rows}  # also a warm-up
    times = {row: [] for row in rows}
    for round_ in range(args.rounds):
        order = rows[round_ % len(rows):] + rows[:round_ % len(rows)]
        for row in order:
            start = time.perf_counter()
            steps[row]()
            times[row].append(time.perf_counter() - start)
    for row in rows:
        result[row]["step_s_median"] = statistics.median(times[row])
        result[row]["step_s_all"] = [round(t, 3) for t in times[row]]
    del built, steps
    if not args.no_memory:
        for row in rows:
            result[row].update(peak_rss_of(row, args))
    print(json.dumps(result, indent=1))
    _print_ratios(result)


def _print_ratios(result) -> None:
    if not {"floor", "paca", "peft-lora"} <= result.keys():
        return
    floor, paca, lora = result["floor"], result["paca"], result["peft-lora"]
    print(f"step time   paca/peft-lora {paca['step_s_median'] / lora['step_s_median']:.3f}   "
          f"paca/floor {paca['step_s_median'] / floor['step_s_median']:.3f}")
    above = (paca["saved_bytes"] - floor["saved_bytes"]) / max(1, lora["saved_bytes"] - floor["saved_bytes"])
    print(f"saved for backward above floor: paca/peft-lora {above:.3f}")
    if "peak_rss_bytes" in paca:
        print(f"peak memory  paca/peft-lora {paca['peak_rss_bytes'] / lora['peak_rss_bytes']:.3f}   above the "
              f"loaded model {paca['peak_rss_above_model_bytes'] / lora['peak_rss_above_model_bytes']:.3f}")


if __name__ == "__main__":
    main()
