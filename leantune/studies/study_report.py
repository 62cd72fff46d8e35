"""The study's report from the finished rows: results.json, results.md (the paper's table, one block
per model), the paired comparisons, the paper's three findings checked, and the charts.

The base model is run two ways (chat_base); the comparisons use the stronger of the two (more
passing tests that call the function under test; on a tie, the chat template), so that a gain over
the base is never a gain over a prompt the base model was not made for. Both base rows are in the
table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .metrics import coverage_values
from .method_run import RESULT_FILE
from .stats import compare_methods, cost_efficiency, mean_estimate, rate, summarize_method
from .study_config import BASE, LABELS, StudyConfig, model_folder_name
from .study_findings import findings
from .study_charts import write_charts

EXECUTABLE = ("pass", "fail")  # ran to the end: every assert evaluated, no error, no limit hit
BASE_LABELS = {"prompt": "Base (training prompt)", "chat": "Base (chat template)"}


def load_rows(config: StudyConfig, out: Path, model: str) -> list[dict[str, Any]]:
    """One entry per table row: a method, or one of the base model's two ways of being asked."""
    entries = []
    for method in config.methods:
        path = out / model_folder_name(model) / method / RESULT_FILE
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for variant, judged in result["variants"].items():
            label = BASE_LABELS[variant] if method == BASE else LABELS[method]
            entries.append({"key": method if method != BASE else f"base-{variant}", "method": method,
                            "label": label, "result": result, "rows": judged["rows"], "judged": judged})
    return entries


def describe(entry: dict[str, Any]) -> dict[str, Any]:
    """A table row: the estimates, the costs, the executable share and its coverage."""
    rows, result = entry["rows"], entry["result"]
    estimates = summarize_method(rows)
    executable = [row for row in rows if row["status"] in EXECUTABLE]
    estimates["executable"] = rate(len(executable), len(rows))
    estimates["line_coverage_executable"] = mean_estimate(coverage_values(executable, "line"))
    train = result.get("train") or {}
    return {
        "key": entry["key"], "method": entry["method"], "label": entry["label"],
        "trainable": result["trainable"], "total": result["total"],
        "share": result["trainable"] / result["total"] if result["total"] else 0.0,
        "estimates": {name: estimate.to_dict() for name, estimate in estimates.items()},
        "counts": entry["judged"]["counts"],
        "train_seconds": train.get("time_s"), "peak_memory_bytes": train.get("peak_memory_bytes"),
        "tokens_per_s": train.get("tokens_per_s"), "eval_loss_after": train.get("eval_loss_after"),
        "generation_seconds": entry["judged"].get("generation_seconds"), "settings": result.get("settings"),
        "tests": [{k: row.get(k) for k in ("task_id", "test", "status", "detail", "coverage", "mutation", "codebleu")}
                  for row in rows],
    }


def reference_base(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    bases = [e for e in entries if e["method"] == BASE]
    if not bases:
        return None
    return max(bases, key=lambda e: (sum(row["status"] == "pass" and row["calls_function"] for row in e["rows"]),
                                     e["key"] == "base-chat"))


def comparisons(entries: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any]:
    """Each trained method against the reference base and against full fine-tuning (pass: McNemar)."""
    full = next((e for e in entries if e["method"] == "full"), None)
    found: dict[str, Any] = {}
    for entry in entries:
        if entry["method"] == BASE:
            continue
        against = {}
        for other, name in ((base, "base"), (full, "full")):
            if other is None or other is entry:
                continue
            compared = compare_methods(entry["rows"], other["rows"], names=(entry["key"], other["key"]))
            against[name] = {column: {"verdict": c["verdict"],
                                      **({"p_value": c["mcnemar"].p_value} if "mcnemar" in c else {})}
                             for column, c in compared.items()}
        found[entry["key"]] = against
    return found


def add_cost_efficiency(described: list[dict[str, Any]], base: dict[str, Any] | None) -> None:
    if base is None:
        return
    base_row = next(d for d in described if d["key"] == base["key"])
    for row in described:
        if row["method"] == BASE or not row["trainable"]:
            continue
        row["cost_efficiency"] = {
            column: cost_efficiency(row["estimates"][column]["value"] or 0.0,
                                    base_row["estimates"][column]["value"] or 0.0, row["trainable"], row["total"])
            for column in ("pass", "pass_with_call", "mutation_score", "line_coverage")}


def write_report(config: StudyConfig, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"config": config.to_dict(), "models": {}}
    sections = []
    for model in config.models:
        entries = load_rows(config, out, model)
        if not entries:
            continue
        base = reference_base(entries)
        described = [describe(e) for e in entries]
        add_cost_efficiency(described, base)
        compared = comparisons(entries, base)
        block = {"rows": described, "reference_base": base["key"] if base else None, "comparisons": compared,
                 "functions": len(entries[0]["rows"])}
        block["findings"] = findings(block)
        block["charts"] = write_charts(out, model_folder_name(model), described)
        results["models"][model] = block
        sections.append(markdown_section(model, block))
    text = "# Unit-test generation study\n\n" + "\n\n".join(sections) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    return results


# -- markdown ------------------------------------------------------------------------------------

def _pct(estimate: dict[str, Any], interval: bool = True) -> str:
    if estimate["value"] is None:
        return "–"
    text = f"{100 * estimate['value']:.1f}"
    return text + (f" [{100 * estimate['low']:.0f}–{100 * estimate['high']:.0f}]" if interval else "")


def _count(n: int, share: float) -> str:
    return "0" if not n else f"{n:,} ({100 * share:.3g}%)"


def _number(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


TABLE_HEADER = ("| method | trainable params | syntax % | CodeBLEU | pass % | pass+call % | line cov % | "
                "branch cov % | mutation % (all) | mutation % (passing) | train s | peak MiB | tokens/s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_line(row: dict[str, Any]) -> str:
    e = row["estimates"]
    peak = row["peak_memory_bytes"]
    return (f"| {row['label']} | {_count(row['trainable'], row['share'])} | {_pct(e['parse'])} | "
            f"{_number(e['codebleu']['value'], '.3f')} | {_pct(e['pass'])} | {_pct(e['pass_with_call'])} | "
            f"{_pct(e['line_coverage'])} | "
            f"{_pct(e['branch_coverage'])} | {_pct(e['mutation_score'])} | {_pct(e['mutation_score_passing'])} | "
            f"{_number(row['train_seconds'], '.0f')} | {_number(peak and peak / 2 ** 20, ',.0f')} | "
            f"{_number(row['tokens_per_s'], ',.0f')} |")


def markdown_section(model: str, block: dict[str, Any]) -> str:
    lines = [f"## {model}: {block['functions']} held-out functions", "", TABLE_HEADER]
    lines += [table_line(row) for row in block["rows"]]
    lines += ["", "Percentages with 95% intervals: Wilson for syntax and pass, percentile bootstrap (2,000 "
              "resamples) for the means. Mutation % (all) scores every generated test (one that does not pass "
              "kills nothing); (passing) only the tests that pass on the reference. Costs: training time and "
              "peak resident memory of the method's own process, tokens/s of training.", ""]
    if block["reference_base"]:
        lines.append(f"Comparisons use **{block['reference_base']}** as the base: the base row with more passing "
                     "tests that call the function under test. They compare pass+call (a passing test that never "
                     "calls the function, or calls its own copy of it, tests nothing), paired per function "
                     "(McNemar's exact test); means by their intervals.")
        lines.append("")
        lines.append("| method | pass+call vs base (McNemar p) | pass+call vs full (McNemar p) | mutation vs base | "
                     "pass+call gain per trainable share |")
        lines.append("|---|---|---|---|---|")
        for row in block["rows"]:
            if row["method"] == BASE:
                continue
            c = block["comparisons"][row["key"]]
            lines.append(f"| {row['label']} | {_verdict(c.get('base'), 'pass_with_call')} | "
                         f"{_verdict(c.get('full'), 'pass_with_call')} | {_verdict(c.get('base'), 'mutation_score')} | "
                         f"{_number(row.get('cost_efficiency', {}).get('pass_with_call'), '.3g')} |")
    lines += ["", "### The paper's findings, here", ""]
    lines += block["findings"]
    if block["charts"]:
        lines += ["", " ".join(f"![{name}]({name})" for name in block["charts"])]
    return "\n".join(lines)


def _verdict(compared: dict[str, Any] | None, column: str) -> str:
    if not compared:
        return "–"
    entry = compared[column]
    p = f" (p={entry['p_value']:.2g})" if "p_value" in entry else ""
    return entry["verdict"] + p

