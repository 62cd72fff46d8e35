"""Serving many LoRA adapters over one base model: `leantune serve` under load, against PEFT.

    python benchmarks/serve_load.py --out benchmarks/results/DATE-cpu-serve [--quick]

On the embedded SmolLM2-135M with 1, 4 and 16 distinct LoRA adapters (r=16, α=32, all 7
projections, random non-zero B), 1, 8 and 32 concurrent streaming clients, prompts of 100-300
tokens (humaneval-tests prompts), 64 generated tokens each (`ignore_eos`), greedy:
requests/s, generated tokens/s, p50/p95/p99 latency and time to first token. The server is a
real `leantune serve` process on 127.0.0.1; the clients are threads of this process.

Side by side in the same run, at 16 adapters and 8 clients, in interleaved rounds (`--rounds`, 3 by
default: mixed, all for one adapter, PEFT; again), so that the VM's drift hits all three alike and the
ratios are read round by round (their median is what the targets are judged on):
- the same requests served one at a time by PEFT's `generate(adapter_names=[name])` (S-LoRA's
  "PEFT" baseline), on the same adapters (leantune exports them in PEFT's format, PEFT loads them),
  while the server idles;
- the same requests all for one adapter (16 adapters loaded, 8 clients);
- the decode step alone: 32 rows, one new token each over a 128-token cache, 16 distinct adapters
  (leantune `adapter_names=` and PEFT `adapter_names=`) against one adapter for the whole batch.
Everything is local and bounded: each phase stops by itself.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

import leantune as lt
from leantune import api
from leantune.data.humaneval import load_split
from leantune.methods.layer import adapter_layers

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 64
GRID = [f"{a}x{c}" for a in (1, 4, 16) for c in (1, 8, 32)]


def make_adapters(folder: Path, count: int) -> list[Path]:
    """`count` LoRA r=16 adapters with random B, exported in PEFT's format (what vLLM and PEFT load)."""
    model = lt.load_model(MODEL)
    paths = []
    for i in range(count):
        lt.attach(model, lt.LoRA(r=16, alpha=32, targets=TARGETS), adapter_name=f"a{i}")
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in adapter_layers(model, f"a{i}"):
                layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=generator))
        paths.append(lt.export_peft(model, folder / f"a{i}", adapter_name=f"a{i}"))
    return paths


def prompts(tokenizer, count: int) -> list[str]:
    chosen = [r["prompt"] for r in load_split("all") if 100 <= len(tokenizer(r["prompt"])["input_ids"]) <= 300]
    return [chosen[i % len(chosen)] for i in range(count)]


# -- the server under load -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(paths: list[Path]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "leantune", "serve", "--model", MODEL, "--port", str(port), "--max-batch", "32"]
    for i, path in enumerate(paths):
        command += ["--adapter", f"a{i}={path}"]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            httpx.get(url + "/v1/models", timeout=2)
            return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def one_request(url: str, model: str, prompt: str) -> dict:
    started = time.perf_counter()
    first = None
    usage = {}
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    return {"latency": ended - started, "ttft": (first or ended) - started, "tokens": usage.get("completion_tokens", 0)}


def run_load(url: str, jobs: list[tuple[str, str]], clients: int, raw: bool = False):
    """Run `jobs` with `clients` concurrent clients: the summary, or with `raw` (results, seconds)."""
    results, lock, cursor = [], threading.Lock(), iter(range(len(jobs)))

    def client() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            result = one_request(url, *jobs[index])
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return (results, seconds) if raw else summarize(results, seconds)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(results: list[dict], seconds: float) -> dict:
    latency = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {"requests": len(results), "seconds": round(seconds, 2),
            "requests_per_s": round(len(results) / seconds, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 1),
            "latency_p50": round(_quantile(latency, 0.5), 2), "latency_p95": round(_quantile(latency, 0.95), 2),
            "latency_p99": round(_quantile(latency, 0.99), 2), "ttft_p50": round(_quantile(ttft, 0.5), 2),
            "ttft_p95": round(_quantile(ttft, 0.95), 2)}


# -- PEFT, one request at a time ------------------------------------------------------------------------

def peft_model(paths: list[Path]):
    import peft  # the baseline's own library

    # the model as transformers builds it (torch's own GEMMs), as PEFT's users run it
    model = peft.PeftModel.from_pretrained(lt.load_model(MODEL, fast_linears=False), str(paths[0]),
                                           adapter_name="a0")
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model.eval()


def peft_one_at_a_time(model, tokenizer, jobs: list[tuple[str, str]]) -> tuple[list[dict], float]:
    """Each job alone through PEFT's generate: the per-request results and the seconds in all."""
    results = []
    started = time.perf_counter()
    for name, prompt in jobs:
        ids = tokenizer(prompt, return_tensors="pt")
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, adapter_names=[name], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
        end = time.perf_counter()
        results.append({"latency": end - begin, "ttft": float("nan"), "tokens": out.shape[1] - ids["input_ids"].shape[1]})
    return results, time.perf_counter() - started


def compare_rounds(url: str, theirs, tokenizer, rounds: int, requests: int) -> dict:
    """16 adapters, 8 clients: mixed, all for one adapter, PEFT one at a time, `rounds` times in turn.

    The load rows pool every round (their requests and seconds); the ratios are taken per round,
    and the median of those is what the targets read."""
    jobs = [(f"a{i % 16}", p) for i, p in enumerate(prompts(tokenizer, requests))]
    found: dict[str, list] = {"mixed": [], "same": [], "peft": []}
    peft_one_at_a_time(theirs, tokenizer, jobs[:1])  # warm-up: first-call costs stay out of round 1 (the server had one)
    for _ in range(rounds):
        found["mixed"].append(run_load(url, jobs, 8, raw=True))
        found["same"].append(run_load(url, [("a0", p) for _, p in jobs], 8, raw=True))
        found["peft"].append(peft_one_at_a_time(theirs, tokenizer, jobs))
        print(json.dumps({f"{k}_tokens_per_s": round(_tokens_per_s(v[-1]), 1) for k, v in found.items()}), flush=True)
    per_round = [{"vs_peft": _tokens_per_s(m) / _tokens_per_s(p), "mixed_over_same": _tokens_per_s(m) / _tokens_per_s(s)}
                 for m, s, p in zip(found["mixed"], found["same"], found["peft"])]
    peft = _pooled(found["peft"])
    peft.pop("ttft_p50"), peft.pop("ttft_p95")
    return {"load": [{"adapters": 16, "clients": 8, **_pooled(found["mixed"])},
                     {"adapters": 16, "clients": 8, "one_adapter_for_all": True, **_pooled(found["same"])}],
            "peft_one_at_a_time": peft,
            "rounds": [{k: round(v, 3) for k, v in r.items()} for r in per_round],
            "median_vs_peft": round(statistics.median(r["vs_peft"] for r in per_round), 3),
            "median_mixed_over_same": round(statistics.median(r["mixed_over_same"] for r in per_round), 3)}


def _tokens_per_s(run: tuple[list[dict], float]) -> float:
    return sum(r["tokens"] for r in run[0]) / run[1]


def _pooled(runs: list[tuple[list[dict], float]]) -> dict:
    return summarize([r for results, _ in runs for r in results], sum(seconds for _, seconds in runs))


# -- the decode step alone ----------------------------------------------------------------------------

def _cache_keyword(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_step_ms(model, adapter_names, rows: int = 32, context: int = 128, steps: int = 5,
                   as_generate: bool = False) -> float:
    """Median ms of one decode step (one token per row) over a `context`-token cache.

    `as_generate`: leantune's steps after the prefill skip re-reading the adapters, as its
    `generate(adapter_names=...)` and `leantune serve` do; otherwise every step is a bare forward
    call, which compares every adapter tensor with its stacked copy."""
    from transformers import DynamicCache

    keyword = _cache_keyword(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10000, (rows, context), generator=generator)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{keyword: cache}, **extra)
        if as_generate:
            api.router(model).trust_versions = True
        token = torch.randint(0, 10000, (rows, 1), generator=generator)
        mask = torch.ones(rows, context + 1, dtype=torch.long)
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            model(input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache}, **extra)
            times.append(time.perf_counter() - started)
            cache.crop(-1)  # drop the token just added: every step sees the same cache
        if as_generate:
            api.router(model).trust_versions = False
    return 1e3 * statistics.median(times[1:])


def decode_steps(paths: list[Path], repeats: int) -> dict:
    ours = lt.load_model(MODEL).eval()
    for i, path in enumerate(paths):
        lt.import_peft(ours, path, adapter_name=f"a{i}")
    alone = lt.import_peft(lt.load_model(MODEL).eval(), paths[0], adapter_name="a0")  # the one-adapter reference
    theirs = peft_model(paths)
    mixed = [f"a{i % len(paths)}" for i in range(32)]
    found: dict[str, list[float]] = {k: [] for k in ("leantune_mixed", "leantune_mixed_bare_forward", "leantune_one",
                                                     "leantune_one_of_16", "peft_mixed", "peft_one")}
    for _ in range(repeats):  # interleaved, so drift on the VM hits every configuration alike
        found["leantune_mixed"].append(decode_step_ms(ours, mixed, as_generate=True))
        found["leantune_mixed_bare_forward"].append(decode_step_ms(ours, mixed))
        found["leantune_one"].append(decode_step_ms(alone, None))
        lt.use(ours, "a0")  # one selected of the 16 attached: a plain forward passes the 15 others' wrappers
        found["leantune_one_of_16"].append(decode_step_ms(ours, None))
        lt.use(ours, None)
        found["peft_mixed"].append(decode_step_ms(theirs, mixed))
        theirs.set_adapter("a0")
        found["peft_one"].append(decode_step_ms(theirs, None))
    return {k: round(statistics.median(v), 1) for k, v in found.items()} | {"runs_ms": found}


# -- the whole benchmark -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (a smoke run)")
    parser.add_argument("--decode-only", action="store_true", help="only the decode-step comparison (adapters in --out)")
    parser.add_argument("--report-only", action="store_true", help="redraw results.md and chart.png from results.json")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the 16x8 comparison (mixed, one adapter, PEFT), default 3")
    parser.add_argument("--grid", nargs="+", default=GRID, metavar="ADAPTERSxCLIENTS",
                        help="the load rows to run (default: all of 1, 4, 16 adapters x 1, 8, 32 clients; 16x8 is "
                             "always run: the targets and the PEFT baseline use it)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = lt.load_tokenizer(MODEL)
    if args.report_only:
        write_report(json.loads((out / "results.json").read_text()), out)
        return
    if args.decode_only:
        paths = [out / "adapters" / f"a{i}" for i in range(16)]
        step = decode_steps(paths, repeats=2 if args.quick else 3)
        (out / "decode_step.json").write_text(json.dumps(step, indent=1) + "\n")
        (out / "decode_step.md").write_text("\n".join(decode_report(step)) + "\n")
        print("\n".join(decode_report(step)), flush=True)
        return
    paths = make_adapters(out / "adapters", 16)
    results: dict = {"command": " ".join(["python"] + sys.argv), "model": MODEL, "new_tokens": NEW_TOKENS,
                     "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load": []}
    grid = {tuple(int(n) for n in cell.split("x")) for cell in args.grid} | {(16, 8)}
    theirs = peft_model(paths)
    for adapters in sorted({a for a, _ in grid}):
        process, url = start_server(paths[:adapters])
        try:
            one_request(url, "a0", prompts(tokenizer, 1)[0])  # warm-up
            for clients in sorted(c for a, c in grid if a == adapters):
                if (adapters, clients) == (16, 8):
                    compared = compare_rounds(url, theirs, tokenizer, rounds=1 if args.quick else args.rounds,
                                              requests=8 if args.quick else 24)
                    results["load"] += compared.pop("load")
                    results.update(compared)
                    continue
                count = max(4, clients * (1 if args.quick else 2))
                jobs = [(f"a{i % adapters}", p) for i, p in enumerate(prompts(tokenizer, count))]
                row = {"adapters": adapters, "clients": clients, **run_load(url, jobs, clients)}
                results["load"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=120)
    del theirs
    results["decode_step"] = decode_steps(paths, repeats=2 if args.quick else 3)
    print(json.dumps({k: v for k, v in results["decode_step"].items() if k != "runs_ms"}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, out)


def write_report(results: dict, out: Path) -> None:
    (out / "results.md").write_text(report(results) + "\n![throughput and decode step](chart.png)\n")
    (out / "chart.png").write_bytes(chart_png(results))
    print(report(results))


def chart_png(results: dict) -> bytes:
    """Generated tokens/s of every load row and the PEFT baseline; the decode step, mixed and one adapter."""
    from io import BytesIO

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (load_axis, step_axis) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1.4]})
    rows = results["load"]
    labels = [f"{r['adapters']}{' (1)' if r.get('one_adapter_for_all') else ''} x {r['clients']}" for r in rows]
    labels.append("PEFT, one at a time")
    values = [r["tokens_per_s"] for r in rows] + [results["peft_one_at_a_time"]["tokens_per_s"]]
    colors = ["#1f77b4"] * len(rows) + ["#ff7f0e"]
    load_axis.bar(range(len(values)), values, color=colors)
    load_axis.set_xticks(range(len(values)), labels, rotation=45, ha="right")
    load_axis.set_title("leantune serve: generated tokens/s (adapters x clients; (1): all to one adapter)")
    d = results["decode_step"]
    names = ["leantune mixed", "leantune one", "PEFT mixed", "PEFT one"]
    step_axis.bar(range(4), [d["leantune_mixed"], d["leantune_one"], d["peft_mixed"], d["peft_one"]],
                  color=["#1f77b4", "#9ecae1", "#ff7f0e", "#fdd0a2"])
    step_axis.set_xticks(range(4), names, rotation=45, ha="right")
    step_axis.set_title("decode step, 32 rows, 16 adapters (ms)")
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def report(results: dict) -> str:
    lines = ["| adapters | clients | requests | req/s | gen tok/s | p50 s | p95 s | p99 s | TTFT p50 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["load"]:
        label = f"{row['adapters']} (all to one)" if row.get("one_adapter_for_all") else str(row["adapters"])
        lines.append(f"| {label} | {row['clients']} | {row['requests']} | {row['requests_per_s']} | {row['tokens_per_s']} | "
                     f"{row['latency_p50']} | {row['latency_p95']} | {row['latency_p99']} | {row['ttft_p50']} |")
    peft = results["peft_one_at_a_time"]
    lines.append(f"| 16, PEFT one at a time | 1 | {peft['requests']} | {peft['requests_per_s']} | {peft['tokens_per_s']} | "
                 f"{peft['latency_p50']} | {peft['latency_p95']} | {peft['latency_p99']} | – |")
    mixed = next(r for r in results["load"] if r["adapters"] == 16 and r["clients"] == 8 and not r.get("one_adapter_for_all"))
    same = next(r for r in results["load"] if r.get("one_adapter_for_all"))
    lines += ["", f"At 16 adapters and 8 clients: {mixed['tokens_per_s'] / peft['tokens_per_s']:.2f}x the one-at-a-time "
              f"PEFT baseline's generated tokens/s; mixed adapters {mixed['tokens_per_s'] / same['tokens_per_s']:.2f}x "
              "the same requests all for one adapter (every round pooled).", ""] + rounds_report(results)
    lines += decode_report(results["decode_step"])
    return "\n".join(lines)


def rounds_report(results: dict) -> list[str]:
    """The 16x8 ratios round by round (absent from runs before the rounds were interleaved)."""
    if "rounds" not in results:
        return []
    lines = ["| round | vs PEFT one at a time (target >= 4x) | mixed / same adapter (target >= 0.85) |", "|---|---|---|"]
    lines += [f"| {i + 1} | {r['vs_peft']:.2f}x | {r['mixed_over_same']:.2f} |" for i, r in enumerate(results["rounds"])]
    lines += [f"| median | {results['median_vs_peft']:.2f}x | {results['median_mixed_over_same']:.2f} |", ""]
    return lines


def decode_report(d: dict) -> list[str]:
    return ["Decode step (32 rows, 128-token cache, 16 distinct r=16 adapters on all 7 projections), median ms; "
            "leantune's one adapter: a model with only that adapter attached:", "",
            "| | mixed (16 adapters) | one adapter | mixed / one |", "|---|---|---|---|",
            f"| leantune (as generate and serve run it) | {d['leantune_mixed']} | {d['leantune_one']} | "
            f"{d['leantune_mixed'] / d['leantune_one']:.2f} |",
            f"| leantune, bare forward calls | {d['leantune_mixed_bare_forward']} | {d['leantune_one']} | "
            f"{d['leantune_mixed_bare_forward'] / d['leantune_one']:.2f} |",
            *([f"| leantune, one adapter selected (`lt.use`) of the 16 attached | | {d['leantune_one_of_16']} | |"]
              if "leantune_one_of_16" in d else []),
            f"| PEFT | {d['peft_mixed']} | {d['peft_one']} | {d['peft_mixed'] / d['peft_one']:.2f} |", "",
            f"PEFT's mixed step takes {d['peft_mixed'] / d['leantune_mixed']:.2f}x the time of leantune's mixed step "
            f"({d['peft_mixed'] / d['leantune_mixed_bare_forward']:.2f}x with bare forward calls).", ""]


if __name__ == "__main__":
    main()

