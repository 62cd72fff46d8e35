"""The paper's three findings, checked against one model's rows (Storhaug & Li):

1. LoRA comes close to full fine-tuning;
2. prompt tuning is the most cost-effective (gain over base per share of trainable parameters);
   measured on pass+call, the passing tests that call the function under test;
3. tuned models produce fewer executable tests, but the executable ones cover more.

Each comes back as one sentence that says whether it holds here and on what numbers; where the
intervals or the paired test cannot tell the rows apart, the sentence says so.
"""
from __future__ import annotations

from typing import Any

from .stats import NO_DIFFERENCE
from .study_config import BASE


def _pct(estimate: dict[str, Any]) -> str:
    return "–" if estimate["value"] is None else f"{100 * estimate['value']:.1f}%"


def _apart(first: dict[str, Any], second: dict[str, Any]) -> bool:
    if None in (first["low"], first["high"], second["low"], second["high"]):
        return False
    return first["low"] > second["high"] or second["low"] > first["high"]


def findings(block: dict[str, Any]) -> list[str]:
    rows = {row["key"]: row for row in block["rows"]}
    base = rows.get(block["reference_base"]) if block["reference_base"] else None
    return [lora_close_to_full(rows, block["comparisons"]), prompt_most_cost_effective(rows, block["comparisons"]),
            fewer_executable_more_coverage(rows, base)]


def lora_close_to_full(rows: dict[str, Any], compared: dict[str, Any]) -> str:
    if "lora" not in rows or "full" not in rows:
        return "1. LoRA close to full fine-tuning: not tested (the study needs both rows)."
    against = compared["lora"]["full"]
    worse = [column for column in ("pass_with_call", "line_coverage", "mutation_score")
             if against[column]["verdict"] == "full is higher"]
    lora, full = rows["lora"]["estimates"], rows["full"]["estimates"]
    numbers = (f"pass+call {_pct(lora['pass_with_call'])} against {_pct(full['pass_with_call'])} "
               f"(McNemar p={against['pass_with_call']['p_value']:.2g}), "
               f"line coverage {_pct(lora['line_coverage'])} against {_pct(full['line_coverage'])}, mutation score "
               f"{_pct(lora['mutation_score'])} against {_pct(full['mutation_score'])}")
    if worse:
        return f"1. LoRA close to full fine-tuning: **does not hold** (full is higher on {', '.join(worse)}): {numbers}."
    behind = [column for column in ("pass_with_call", "line_coverage", "mutation_score")
              if (lora[column]["value"] or 0) < (full[column]["value"] or 0)]
    if behind:  # a gap that this sample cannot tell from noise is not evidence of closeness
        return (f"1. LoRA close to full fine-tuning: **not contradicted** (full is ahead on {', '.join(behind)} "
                f"by point estimate, {NO_DIFFERENCE} at this sample size): {numbers}.")
    return (f"1. LoRA close to full fine-tuning: **holds** (LoRA at or above full on every column, with "
            f"{100 * rows['lora']['share']:.2g}% of the parameters trained): {numbers}.")


def prompt_most_cost_effective(rows: dict[str, Any], compared: dict[str, Any]) -> str:
    efficiency = {key: row["cost_efficiency"]["pass_with_call"] for key, row in rows.items() if "cost_efficiency" in row}
    if "prompt" not in efficiency:
        return "2. Prompt tuning the most cost-effective: not tested (the study needs a base row and prompt tuning)."
    prompt = rows["prompt"]
    gain = efficiency["prompt"] * prompt["share"]
    verdict = compared["prompt"]["base"]["pass_with_call"]
    measurable = (f"the gain over base is {'not ' if verdict['verdict'] == NO_DIFFERENCE else ''}measurable "
                  f"(McNemar p={verdict['p_value']:.2g})")
    if gain <= 0:
        return (f"2. Prompt tuning the most cost-effective: **does not hold**: it does not raise the pass rate over "
                f"the base (pass+call {_pct(prompt['estimates']['pass_with_call'])}, a change of {100 * gain:+.1f} points).")
    best = max(efficiency, key=efficiency.get)
    others = ", ".join(f"{rows[k]['label']} {efficiency[k]:.3g}" for k in sorted(efficiency, key=efficiency.get,
                                                                                reverse=True) if k != "prompt")
    if best != "prompt":
        holds = "does not hold"
    else:  # a tiny share turns any gain into the top ratio: the gain itself must be measurable
        holds = "holds" if verdict["verdict"] != NO_DIFFERENCE else "not shown (the gain is not measurable)"
    return (f"2. Prompt tuning the most cost-effective: **{holds}**: pass+call gain per trainable share "
            f"{efficiency['prompt']:.3g} ({100 * gain:+.1f} points with {100 * prompt['share']:.2g}% trained; "
            f"{others}); {measurable}.")


def fewer_executable_more_coverage(rows: dict[str, Any], base: dict[str, Any] | None) -> str:
    if base is None:
        return "3. Fewer executable tests, but more coverage: not tested (no base row)."
    tuned = [row for row in rows.values() if row["method"] != BASE]
    if not tuned:
        return "3. Fewer executable tests, but more coverage: not tested (no tuned row)."
    b = base["estimates"]
    holding, measured = [], []
    for row in tuned:
        e = row["estimates"]
        fewer = (e["executable"]["value"] or 0) < (b["executable"]["value"] or 0)
        more = (e["line_coverage_executable"]["value"] or 0) > (b["line_coverage_executable"]["value"] or 0)
        if fewer and more:
            holding.append(row["label"])
            if _apart(e["executable"], b["executable"]) and _apart(e["line_coverage_executable"],
                                                                   b["line_coverage_executable"]):
                measured.append(row["label"])
    summary = "; ".join(f"{row['label']} {_pct(row['estimates']['executable'])} executable, "
                        f"{_pct(row['estimates']['line_coverage_executable'])} line coverage"
                        for row in tuned)
    if len(measured) == len(tuned):
        status = "holds"
    elif len(holding) == len(tuned):
        status = "holds in point estimates only"
    elif holding:
        status = f"holds for {len(holding)} of {len(tuned)} methods ({', '.join(holding)})"
    else:
        status = "does not hold"
    head = (f"3. Fewer executable tests, but the executable ones cover more: **{status}** (base {_pct(b['executable'])} executable, {_pct(b['line_coverage_executable'])} line coverage; "
            f"{summary})")
    tail = (f"; measurably apart on both for {', '.join(measured)}." if measured else
            f"; {NO_DIFFERENCE} on both at once for any method (intervals overlap).")
    return head + tail
