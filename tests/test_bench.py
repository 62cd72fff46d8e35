import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_user_error
import leantune as lt
from leantune import cli
from leantune.errors import LeantuneError
from leantune.bench import measure, report, runner
from leantune.bench.profile import classify
from leantune.bench.rows import PRESETS, parse_overrides, parse_row_names, row_settings
from leantune.bench.search import longest_fitting
from leantune.bench.targets import read_targets, target_rows
from leantune.bench.worker import WorkerSpec
from leantune.bench.worker import run_measurement as measure_in_process


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from threads, and on a busy machine two spinning threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # worker processes too
    yield
    torch.set_num_threads(threads)


# -- the longest sequence that fits ------------------------------------------------------------

@pytest.mark.parametrize("threshold", [64, 100, 128, 1000, 1024, 1100, 3000, 5000, 8191, 8192, 9000])
@pytest.mark.parametrize("start", [64, 1024, 4096, 20000])
def test_search_finds_the_largest_fitting_multiple(threshold, start):
    asked = []

    def fits(seq):
        asked.append(seq)
        return seq <= threshold

    found = longest_fitting(fits, step=64, limit=8192, start=start)
    assert found == min(threshold, 8192) // 64 * 64
    assert len(asked) == len(set(asked)), "a length was probed twice"
    assert all(seq % 64 == 0 and 64 <= seq <= 8192 for seq in asked)
    assert len(asked) <= 2 * 8 + 1  # logarithmic in the 128 candidate lengths


def test_search_reports_zero_when_nothing_fits():
    assert longest_fitting(lambda seq: False, step=64, limit=1024, start=512) == 0


def test_search_rejects_a_step_above_the_limit():
    with pytest.raises(ValueError, match=r"need 1 <= step <= limit, got step=128, limit=64"):
        longest_fitting(lambda seq: True, step=128, limit=64)


# -- bytes saved for backward ------------------------------------------------------------------

def test_saved_bytes_count_unique_storages_and_skip_parameters():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    with measure.saved_for_backward(measure.model_storages(layer)) as seen:
        hidden = layer(x)  # saves x (and the weight, which is excluded)
        both = hidden * hidden.t().t()  # two views of one storage: counted once
        both.sum().backward()
    assert sum(seen.values()) == x.numel() * 4 + hidden.numel() * 4


def test_profile_groups_operators_by_kind():
    assert classify("aten::addmm") == "matmul"
    assert classify("aten::mul_") == "elementwise"
    assert classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert classify("aten::_log_softmax") == "reduction/norm/loss"
    assert classify("aten::copy_") == "memory/layout"
    assert classify("SomethingElse") == "other"


# -- rows and their settings -------------------------------------------------------------------

def test_row_names_are_validated_and_peft_rows_appended():
    assert parse_row_names("floor, lora,floor", with_peft=True) == ["floor", "lora", "peft-lora", "peft-dora", "peft-ia3"]
    assert parse_row_names("prefix", with_peft=True) == ["prefix", "peft-lora", "peft-dora", "peft-ia3", "peft-prefix"]
    with pytest.raises(Exception, match="lorra"):
        parse_row_names("floor,lorra", with_peft=False)


def test_presets_pair_paca_r16_with_lora_r8_and_overrides_apply():
    assert row_settings("paca")["r"] == 16 and row_settings("lora")["r"] == 8
    assert row_settings("qpaca") == {**PRESETS["paca"], "quantize": "nf4"}
    assert row_settings("floor") is None
    overrides = parse_overrides(["paca.r=32", "paca.targets=[\"q_proj\"]", "lora.init=pissa"], ["paca", "lora"])
    assert row_settings("paca", overrides)["r"] == 32
    assert row_settings("paca", overrides)["targets"] == ["q_proj"]
    assert row_settings("lora", overrides)["init"] == "pissa"
    with pytest.raises(Exception, match="dora"):
        parse_overrides(["dora.r=4"], ["paca", "lora"])


# -- the worker, in this process ---------------------------------------------------------------

def _spec(row, kind, settings, **changes):
    values = dict(row=row, kind=kind, settings=settings, model="tiny-llama", batch=2, seq=16, steps=2, warmup=1)
    values.update(changes)
    return WorkerSpec(**values)


def test_worker_measures_floor_lora_and_peft_lora():
    results = {}
    for spec in (_spec("floor", "floor", None, profile=True),
                 _spec("lora", "leantune", {"name": "lora", "r": 4, "alpha": 8}),
                 _spec("peft-lora", "peft", {"peft": "lora", "r": 4, "lora_alpha": 8})):
        result = {}
        measure_in_process(spec, result)
        results[spec.row] = result
        assert result["phase"] == "done" and len(result["step_times_s"]) == 2
        assert result["peak_memory_bytes"] >= result["training_peak_bytes"] > 0 and result["fits"]
    floor, lora, peft_lora = results["floor"], results["lora"], results["peft-lora"]
    assert floor["trainable_params"] == 0
    # 2 layers x 7 projections, r=4: A (4 x in) + B (out x 4)
    dims = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    expected = 2 * sum(4 * (i + o) for i, o in dims)
    assert lora["trainable_params"] == peft_lora["trainable_params"] == expected
    assert lora["saved_bytes"] > floor["saved_bytes"] > 0
    assert lora["adapted_base_bytes"]["stored"] == peft_lora["adapted_base_bytes"]["stored"] == 2 * 4 * sum(i * o for i, o in dims)
    assert set(floor["profile"]["groups_ms"]) >= {"matmul", "elementwise", "optimizer"}
    assert lora["matmul_flops"] > floor["matmul_flops"] > 0 and floor["gemm_flops_per_s"] > 0
    again = {}
    measure_in_process(_spec("lora", "leantune", {"name": "lora", "r": 4, "alpha": 8}), again)
    assert again["saved_bytes"] == lora["saved_bytes"]  # deterministic, unlike peak memory


def test_a_frozen_steps_matmul_work_is_forward_and_input_gradients_head_on_loss_positions_and_attention():
    from leantune.bench.bound import attention_flops, counted_flops
    from leantune.loss import causal_lm_loss

    model = lt.load_model("tiny-llama").requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    counted = counted_flops(lambda: causal_lm_loss(model, ids, ids, chunked=True).backward(), model, [16, 16])
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    by_hand = (2 * 2 * sum(m.in_features * m.out_features for m in linears) * 32  # forward, input gradient
               + 2 * 2 * head.in_features * head.out_features * 30  # the head on the 2 x 15 loss positions
               + 3 * 4 * model.config.num_attention_heads * model.config.head_dim * (16 * 17 / 2) * 2
               * model.config.num_hidden_layers)
    assert attention_flops(model, [16, 16]) > 0
    assert counted == by_hand


def test_the_attention_ceiling_times_every_query_block_of_both_products():
    from leantune.bench import bound

    model = lt.load_model("tiny-llama")
    timed = []
    real = bound._median_seconds
    bound._median_seconds = lambda run, repeats, device: timed.append(run) or 1.0
    try:
        rate = bound.attention_gemm_rate(model, 96)
    finally:
        bound._median_seconds = real
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    assert len(timed) == 2 * 2  # blocks of 64 and of all 96 queries; scores and weighted sum
    assert rate == 2.0 * heads * 96 * 96 * head_dim  # the largest block's FLOPs in the stubbed second


def test_lora_fa_rows_keep_x_times_a_only_like_peft_lora_fa():
    results = {}
    for row in ("lora", "lora-fa", "peft-lora-fa", "adapter"):
        kind = "peft" if row.startswith("peft-") else "leantune"
        result = {}
        measure_in_process(_spec(row, kind, row_settings(row), steps=1, warmup=0), result)
        assert result["phase"] == "done", result
        results[row] = result
    lora, fa, peft_fa = results["lora"], results["lora-fa"], results["peft-lora-fa"]
    # r=8: B (out x 8) trains, A does not
    dims = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert fa["trainable_params"] == peft_fa["trainable_params"] == 2 * sum(8 * o for _, o in dims)
    assert fa["saved_bytes"] == peft_fa["saved_bytes"] < lora["saved_bytes"]
    assert results["adapter"]["trainable_params"] == 2 * 2 * 64 * 64  # bottleneck 64 after each mlp


def test_chunked_loss_saves_fewer_bytes_than_full_logits():
    full, chunked = {}, {}
    measure_in_process(_spec("floor", "floor", None, loss="full", steps=1, warmup=0), full)
    measure_in_process(_spec("floor", "floor", None, loss="chunked", steps=1, warmup=0), chunked)
    assert chunked["saved_bytes"] < full["saved_bytes"]


# -- the runner, with a fake worker -----------------------------------------------------------

def _fake_result(spec, step, saved, peak, max_fit=None):
    return {"row": spec.row, "phase": "done", "step_times_s": [step, step * 1.1, step * 0.9],
            "peak_memory_bytes": peak, "peak_rss_bytes": peak, "training_peak_bytes": peak,
            "memory_after_load_bytes": peak // 2, "saved_bytes": saved, "trainable_params": 10,
            "total_params": 100, "model_bytes": 400, "adapted_base_bytes": None,
            "fits": max_fit is None or spec.seq <= max_fit}


PROJECT_TARGETS = Path(__file__).resolve().parents[1] / "benchmarks" / "targets.json"
FAKE = {"floor": (4.0, 1000, 3000, 4096), "lora": (5.0, 1900, 3600, 2048), "peft-lora": (5.5, 2000, 4000, 1536),
        "paca": (4.2, 1090, 3200, 2560)}


def test_run_plan_interleaves_aggregates_and_compares():
    order = []

    def fake_runner(spec):
        order.append(spec.row)
        if spec.row == "dora":
            return {"row": "dora", "phase": "setup", "error": "LeantuneError: unknown method 'dora'"}
        step, saved, peak, max_fit = FAKE[spec.row]
        return _fake_result(spec, step, saved, peak, max_fit)

    plan = runner.BenchPlan(model="tiny-llama", rows=["floor", "lora", "dora", "paca", "peft-lora"],
                            losses=["full"], repeats=2, max_seq_len=True, mem_cap=10**9, seq_step=512,
                            seq_limit=8192, seq_start=1024)
    rows = {e["row"]: e for e in runner.run_plan(plan, runner=fake_runner, log=lambda line: None)["rows"]}
    # A B C A B C, and the setup error is not retried
    assert order[:9] == ["floor", "lora", "dora", "paca", "peft-lora", "floor", "lora", "paca", "peft-lora"]
    assert rows["dora"]["error"] == "LeantuneError: unknown method 'dora'"
    paca, peft_lora, floor = rows["paca"], rows["peft-lora"], rows["floor"]
    assert paca["step_time_s"] == {"median": 4.2, "min": 4.2 * 0.9, "max": 4.2 * 1.1}
    assert paca["tokens_per_s"] == pytest.approx(4 * 256 / 4.2)
    assert paca["max_seq_len"]["value"] == 2560 and floor["max_seq_len"]["value"] == 4096
    ratio = paca["ratios"]["peft-lora"]
    assert ratio["step_time"] == pytest.approx(4.2 / 5.5)
    assert ratio["peak_memory"] == pytest.approx(3200 / 4000)
    assert ratio["saved_bytes"] == pytest.approx(1090 / 2000)
    assert ratio["saved_above_floor"] == pytest.approx((1090 - 1000) / (2000 - 1000))
    assert ratio["max_seq_len"] == pytest.approx(2560 / 1536)
    assert paca["ratios"]["floor"]["step_time"] == pytest.approx(4.2 / 4.0)
    assert rows["lora"]["ratios"]["peft-lora"]["step_time"] == pytest.approx(5.0 / 5.5)
    assert rows["lora"]["peft_counterpart"] == "peft-lora"
    markdown = report.render_markdown({"rows": list(rows.values()), "command": "leantune bench", "date": "today",
                                       "settings": {"model": "tiny-llama", "batch": 4, "seq": 256, "steps": 3,
                                                    "warmup": 1, "repeats": 2, "losses": ["full"],
                                                    "max_seq_len": True, "seq_step": 512, "seq_limit": 8192,
                                                    "mem_cap_bytes": 10**9},
                                       "machine": {"device": "cpu", "cpu": "x", "cores": 2, "torch_threads": 2,
                                                   "torch": "t", "transformers": "t", "peft": "p"},
                                       "targets": read_targets(PROJECT_TARGETS)})
    assert "| paca | full | 4.200 (3.780–4.620)" in markdown and "0.76×" in markdown
    # the project's PaCA targets, judged on these numbers
    assert "| paca step time × peft-lora <= 0.9 | full | 0.764 | yes |" in markdown
    assert "| paca step time × floor <= 1.03 | full | 1.050 | **no** |" in markdown
    assert "| paca saved above floor × peft-lora <= 0.1 | full | 0.090 | yes |" in markdown
    assert "error: LeantuneError: unknown method 'dora'" in markdown


def test_targets_judge_ratios_own_bytes_and_loss_pairs_in_row_order():
    rows = [{"row": "lora", "loss": "chunked", "ratios": {"peft-lora": {"step_time": 0.97}},
             "chunked_vs_full": {"peak_memory": 0.8}},
            {"row": "qpaca", "loss": "chunked", "ratios": {}, "adapted_base_bytes": {"stored": 10, "fp32": 100}},
            {"row": "paca", "loss": "chunked", "error": "boom", "ratios": {"peft-lora": {"step_time": 0.5}}}]
    targets = [{"row": "*", "against": "full-logits loss", "metric": "peak_memory", "op": "<", "bound": 1},
               {"row": "qpaca", "metric": "base_bytes_vs_fp32", "op": "<=", "bound": 0.15},
               {"row": "paca", "against": "peft-lora", "metric": "step_time", "op": "<=", "bound": 0.9},
               {"row": "lora", "against": "peft-lora", "metric": "step_time", "op": ">=", "bound": 0.99}]
    assert target_rows(rows, targets) == [
        ["lora step time × peft-lora >= 0.99", "chunked", "0.970", "**no**"],
        ["qpaca base bytes vs fp32 <= 0.15", "chunked", "0.100", "yes"],
        ["lora peak memory, chunked loss < full-logits loss", "both", "0.800", "yes"],
    ]  # a row that failed is judged on nothing
    assert target_rows(rows, []) == []


@pytest.mark.parametrize("content, after_path", [
    ('{"targets": [{"row": "paca", "metric": "step_time", "op": "<=", "bound": 1}]}',
     ", target 0: metric 'step_time' needs 'against' (a row's own metrics: base_bytes_vs_fp32)"),
    ('{"targets": [{"row": "paca", "against": "floor", "metric": "step_time", "op": "=<", "bound": 1}]}',
     ", target 0: op '=<' is not one of <=, >=, <, >"),
    ('{"targets": [{"row": "paca", "against": "floor", "metric": "step_time", "op": "<="}]}',
     ", target 0: missing bound"),
    ('[]', ": expected an object with a list under 'targets'"),
])
def test_a_malformed_targets_file_is_an_error_naming_the_target(tmp_path, content, after_path):
    path = tmp_path / "targets.json"
    path.write_text(content)
    with pytest.raises(LeantuneError, match=f"^{re.escape(str(path) + after_path)}$"):
        read_targets(path)


def test_the_project_targets_file_reads():
    assert {t["row"] for t in read_targets(PROJECT_TARGETS)} >= {"paca", "lora", "dora", "sketchtune", "qpaca"}


def test_cli_judges_and_records_the_targets_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.BenchPlan, "default_runner", _fake_default_runner())
    targets = tmp_path / "goals.json"
    targets.write_text(json.dumps({"targets": [
        {"row": "lora", "against": "floor", "metric": "step_time", "op": "<=", "bound": 1.5}]}))
    out = tmp_path / "run"
    assert cli.main([*BENCH_ARGS, "--chunked-loss", "off", "--targets", str(targets), "--out", str(out)]) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["targets"] == read_targets(targets) and document["command"].endswith(f"--targets {targets}")
    assert "| lora step time × floor <= 1.5 | full | 1.250 | yes |" in (out / "results.md").read_text()


def test_sketchtune_is_prepared_once_and_a_failed_preparation_is_a_row_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    calls = []

    def fake_runner(spec):
        calls.append((spec.row, spec.task, (spec.settings or {}).get("sketch")))
        if spec.task == "prepare":
            Path(spec.output).mkdir(parents=True)
            return {"row": spec.row, "phase": "done", "output": spec.output}
        return _fake_result(spec, 1.0, 10, 100)

    plan = runner.BenchPlan(model="tiny-llama", rows=["floor", "sketchtune"], losses=["full"], repeats=2)
    rows = runner.run_plan(plan, runner=fake_runner, log=lambda line: None)["rows"]
    sketch = str(runner.prepared_path(plan, row_settings("sketchtune")))
    assert calls == [("sketchtune", "prepare", None), ("floor", "measure", None), ("sketchtune", "measure", sketch),
                     ("floor", "measure", None), ("sketchtune", "measure", sketch)]
    assert rows[1]["settings"]["sketch"] == sketch and not rows[1]["error"]

    def failing_runner(spec):
        if spec.task == "prepare":
            return {"row": spec.row, "phase": "prepare", "error": "LeantuneError: bad calibration"}
        return _fake_result(spec, 1.0, 10, 100)

    plan = runner.BenchPlan(model="tiny-llama", rows=["floor", "sketchtune"], losses=["full"], repeats=2,
                            overrides={"sketchtune": {"bits": 3}})
    rows = runner.run_plan(plan, runner=failing_runner, log=lambda line: None)["rows"]
    assert rows[1]["error"] == "preparation failed: LeantuneError: bad calibration" and not rows[0]["error"]


def test_both_losses_give_pairs_of_rows_compared_within_their_loss():
    def fake_runner(spec):
        step, saved, peak, _ = FAKE[spec.row]
        if spec.loss == "chunked":
            saved, peak = saved - 500, peak - 1000
        return _fake_result(spec, step, saved, peak)

    plan = runner.BenchPlan(model="tiny-llama", rows=["floor", "paca", "peft-lora"], losses=["full", "chunked"], repeats=1)
    rows = {(e["row"], e["loss"]): e for e in runner.run_plan(plan, runner=fake_runner, log=lambda line: None)["rows"]}
    assert len(rows) == 6
    chunked = rows[("paca", "chunked")]
    assert chunked["chunked_vs_full"]["peak_memory"] == pytest.approx((3200 - 1000) / 3200)
    assert chunked["ratios"]["peft-lora"]["peak_memory"] == pytest.approx((3200 - 1000) / (4000 - 1000))
    assert chunked["ratios"]["peft-lora"]["saved_above_floor"] == pytest.approx((1090 - 1000) / (2000 - 1000))
    assert "chunked_vs_full" not in rows[("paca", "full")]


def test_a_probe_error_that_is_not_memory_stops_the_search():
    def fake_runner(spec):
        if spec.seq > 1024:
            return {"row": spec.row, "error": "worker exited with status -11", "out_of_memory": False}
        return _fake_result(spec, 1.0, 10, 100)

    plan = runner.BenchPlan(model="tiny-llama", rows=["lora"], losses=["full"], mem_cap=10**9, seq_step=256)
    found = runner.find_max_seq_len(plan, "lora", "full", fake_runner, log=lambda line: None)
    assert found["value"] is None and "status -11" in found["error"]


# -- real worker processes ---------------------------------------------------------------------

def test_a_crashing_worker_is_a_row_error():
    spec = _spec("lora", "leantune", {"name": "lora"})
    result = runner.run_worker(spec, command=[sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert result["error"] == "worker exited with status 3: boom"


def test_a_worker_over_the_memory_cap_is_killed():
    code = "import time; block = bytearray(400 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(30)"
    spec = _spec("lora", "leantune", {"name": "lora"})
    result = runner.run_worker(spec, rss_cap=200 * 2**20, command=[sys.executable, "-c", code])
    assert result["out_of_memory"] and "memory cap" in result["error"]


def test_cli_end_to_end_on_tiny_llama(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["bench", "--model", "tiny-llama", "--methods", "floor,lora,qlora", "--set", 'qlora.targets=["nothing_here"]',
                       "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "0", "--repeats", "1",
                       "--chunked-loss", "off", "--profile", "--out", str(out)])
    assert status == 0
    document = json.loads((out / "results.json").read_text())
    rows = {e["row"]: e for e in document["rows"]}
    assert list(rows) == ["floor", "lora", "qlora"]
    assert "nothing_here" in rows["qlora"]["error"] and rows["qlora"]["settings"]["quantize"] == "nf4"
    lora, floor = rows["lora"], rows["floor"]
    assert lora["step_time_s"]["median"] == statistics.median(lora["step_times_s"][0])
    assert lora["ratios"]["floor"]["step_time"] == pytest.approx(lora["step_time_s"]["median"] / floor["step_time_s"]["median"])
    assert lora["ratios"]["floor"]["saved_bytes"] == pytest.approx(lora["saved_bytes"] / floor["saved_bytes"])
    assert document["command"].startswith("leantune bench --model tiny-llama --methods floor,lora,qlora")
    assert document["machine"]["cores"] and document["machine"]["torch"] == torch.__version__
    for name in ("results.md", "chart.png", "profile.md"):
        assert (out / name).stat().st_size > 0
    assert "## lora (full loss)" in (out / "profile.md").read_text()


@pytest.mark.parametrize("argv, sentence", [
    (["--methods", "floor,lorra"], r"unknown benchmark method 'lorra' \(did you mean lora, .*\); known: .*bitfit, .*"),
    (["--methods", "floor", "--set", "paca.r=3"],
     r"--set 'paca.r=3' names row 'paca', which is not among the benchmarked rows: floor"),
    (["--methods", "lora", "--set", "lora.r=abc"], r"--set for row 'lora': lora: 'r' must be an integer >= 1, got 'abc'"),
    (["--methods", "paca", "--set", "paca.rr=4"], r"--set for row 'paca': paca: unknown key 'rr' \(did you mean 'r'\?\).*"),
    (["--mem-cap", "six gigs", "--max-seq-len"], r"--mem-cap 'six gigs' is not a size like 6GiB, 6000MB or 6442450944"),
    (["--steps", "0"], r"--steps must be >= 1, got 0"),
    (["--model", "no-such-model"], r"unknown model 'no-such-model': not a folder, not a hub id \(owner/name\), .*"),
    (["--targets", "no-such-targets.json"], r"targets file 'no-such-targets.json' does not exist"),
])
def test_cli_errors_exit_2_naming_the_culprit(argv, sentence, capsys):
    assert cli.main(["bench", "--model", "tiny-llama", *argv]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "bench", sentence)


# -- results on disk: written as rows finish, the chart optional --------------------------------

def _fake_default_runner(stop_at=None, stop_with=KeyboardInterrupt):
    """A BenchPlan.default_runner that measures nothing; `stop_at` row raises `stop_with`."""
    def fake(plan, spec):
        if spec.row == stop_at:
            raise stop_with("stopped")
        step, saved, peak, _ = FAKE[spec.row]
        return _fake_result(spec, step, saved, peak)
    return fake


BENCH_ARGS = ["bench", "--model", "tiny-llama", "--methods", "floor,lora,paca", "--repeats", "1"]


def test_without_matplotlib_the_results_are_written_and_the_chart_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as on a plain install
    monkeypatch.setattr(runner.BenchPlan, "default_runner", _fake_default_runner())
    out = tmp_path / "run"
    assert cli.main([*BENCH_ARGS, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert ("chart skipped: matplotlib is not installed (pip install matplotlib, or install leantune with its "
            "'bench' extra)\n") in captured.out
    assert "Traceback" not in captured.err
    document = json.loads((out / "results.json").read_text())
    assert [e["row"] for e in document["rows"]] == ["floor", "lora", "paca"]
    assert document["complete"] is True and document["chart"] is None
    assert not (out / "chart.png").exists()
    markdown = (out / "results.md").read_text()
    assert "| paca | chunked |" in markdown and "chart.png" not in markdown and "Partial" not in markdown


@pytest.mark.parametrize("stop_with, status", [(KeyboardInterrupt, 130), (RuntimeError, None)])
def test_rows_measured_before_a_run_stops_are_on_disk(tmp_path, monkeypatch, capsys, stop_with, status):
    monkeypatch.setattr(runner.BenchPlan, "default_runner", _fake_default_runner("paca", stop_with))
    out = tmp_path / "run"
    out.mkdir()
    (out / "chart.png").write_bytes(b"an earlier run's chart")
    if status is None:
        with pytest.raises(stop_with):
            cli.main([*BENCH_ARGS, "--out", str(out)])
    else:
        assert cli.main([*BENCH_ARGS, "--out", str(out)]) == status
        assert f"the rows measured so far are in {out}" in capsys.readouterr().err
    document = json.loads((out / "results.json").read_text())
    assert [e["row"] for e in document["rows"]] == ["floor", "lora"] and document["complete"] is False
    assert document["rows"][1]["ratios"]["floor"]["step_time"] == pytest.approx(5.0 / 4.0)
    assert "**Partial results**: 2 of at most 3 runs done" in (out / "results.md").read_text()
    assert not (out / "chart.png").exists()  # nothing of the earlier run is left beside this one's rows
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary files


def test_the_machine_description_imports_neither_peft_nor_bitsandbytes():
    code = ("import sys; from leantune.bench.report import machine_info; info = machine_info('cpu'); "
            "print(info['peft'] is not None, sorted({'peft', 'bitsandbytes'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env_with_repo(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "True []"
    assert "gemm_4bit_forward" not in done.stderr


def _env_with_repo():
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def test_lora_counts_the_same_products_as_peft_lora():
    """LoRA's fused function adds its products in place (addmm_), which torch's FLOP counter leaves
    out by itself: the count was 5.6% short of PEFT LoRA's for the same r, alpha and targets."""
    counts = {}
    for row in ("lora", "peft-lora"):
        result = {}
        measure_in_process(_spec(row, "peft" if row.startswith("peft-") else "leantune", row_settings(row),
                                 steps=1, warmup=0), result)
        assert result["phase"] == "done", result
        counts[row] = result["matmul_flops"]
    assert counts["lora"] == counts["peft-lora"] > 0
