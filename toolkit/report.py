"""The Markdown report and PNG chart of `toolkit eval` (one table of systems × metrics, copy baseline first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit import metrics

NOTE = ("The copy-source baseline (hypothesis = the untranslated source) measures how much {source} and {target} "
        "text share: a model that does not beat it has learned nothing useful.")


def languages(scores: dict[str, Any], fallback: tuple[str, str]) -> tuple[str, str]:
    """(source, target) language names of a scores.json: its prompt's, else `fallback` (e.g. the test columns)."""
    prompt = scores.get("prompt") or {}
    if prompt.get("source_name") and prompt.get("target_name"):
        return prompt["source_name"], prompt["target_name"]
    return fallback


def _cell(value: dict[str, Any]) -> str:
    text = f"{value['score']:.1f}"
    return f"{text} ± {value['ci']:.1f}" if value.get("ci") is not None else text


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _paired_table(paired: dict[str, Any], against: str) -> list[str]:
    rows = []
    for name, per_metric in paired.items():
        cells = []
        for k in metrics.METRIC_KEYS:
            v = per_metric[k]
            cells.append(f"{v['delta']:+.1f} ({_p(v['p_value'])})")
        rows.append([name, *cells])
    return [f"Difference from {against} (paired bootstrap resampling, sacrebleu; TER: lower is better):", "",
            *_table(["System", *(metrics.LABELS[k] for k in metrics.METRIC_KEYS)], rows), ""]


def _outputs_table(outputs: dict[str, Any]) -> list[str]:
    rows = []
    for name, c in outputs.items():
        rl = c.get("reasoning_language") or {}
        share = "n/a" if rl.get("share") is None else f"{100 * rl['share']:.0f}% of {rl['checked']}"
        rows.append([name, str(c["sentences"]), str(c["empty_final"]), str(c["incomplete"]),
                     str(c.get("hit_limit", "-")), str(c.get("stopped_repetition", "-")), str(c["with_analysis"]), f"{share} ({rl.get('language', '-')})", f"{c['tokens_mean']:.1f}",
                     f"{c['latency_p50_s']:.3f} / {c['latency_p95_s']:.3f}"])
    header = ["System", "Sentences", "Empty final", "Final not closed", "Hit token limit", "Loop cut",
              "With analysis", "Reasoning in language",
              "Tokens (mean)", "Latency s (p50 / p95)"]
    return ["Outputs (empty or missing finals are scored as empty strings):", "", *_table(header, rows), ""]


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _terms_table(terms: dict[str, Any]) -> list[str]:
    rows = []
    for name, t in terms.items():
        hinted = (f"{_pct(t['hint_accuracy'])} of {t['hinted']}" if "hinted" in t else "no hints")
        right = (f"{_pct(t['right_hint_accuracy'])} of {t['hinted_in_reference']}" if "hinted" in t else "")
        rows.append([name, f"{_pct(t['reference_term_accuracy'])} of {t['reference_terms']}", hinted, right])
    header = ["System", "Reference terms produced", "Hinted terms produced", "… of hints the reference uses"]
    intro = ("Term accuracy (glossary terms attested in the source and reference, and the glossary hints the prompts "
             "carried: share whose target form is in the output):")
    return [intro, "", *_table(header, rows), ""]


def markdown(scores: dict[str, Any], *, title: str, languages: tuple[str, str] = ("the source", "the target")) -> str:
    """The report: scores with 95% bootstrap intervals, paired tests, output counts, sacrebleu signatures.
    `languages`: the (source, target) names the note on the copy baseline uses."""
    systems = scores["systems"]
    header = ["System", *(metrics.LABELS[k] + (" ↓" if k == "ter" else "") for k in metrics.METRIC_KEYS)]
    rows = [[name, *(_cell(v[k]) for k in metrics.METRIC_KEYS)] for name, v in systems.items()]
    with_ci = any(v[k].get("ci") is not None for v in systems.values() for k in metrics.METRIC_KEYS)
    lines = [f"# Evaluation: {title}", "", *_table(header, rows), "",
             ("Scores ± half-width of the 95% bootstrap confidence interval. " if with_ci else "")
             + NOTE.format(source=languages[0], target=languages[1]), ""]
    if scores.get("paired_vs_copy"):
        lines += _paired_table(scores["paired_vs_copy"], "the copy baseline")
    if scores.get("paired_vs_first"):
        lines += _paired_table(scores["paired_vs_first"], f"the first run ({scores['first']})")
    if scores.get("outputs"):
        lines += _outputs_table(scores["outputs"])
    if scores.get("terms"):
        lines += _terms_table(scores["terms"])
    any_system = next(iter(systems.values()))
    lines += ["sacrebleu signatures:", ""]
    lines += [f"- {metrics.LABELS[k]}: `{any_system[k]['signature']}`" for k in metrics.METRIC_KEYS]
    return "\n".join(lines) + "\n"


def chart(scores: dict[str, Any], path: Path, *, title: str) -> None:
    """Grouped bars: one group per metric, one bar per system, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from toolkit.artifacts import atomic_path

    systems = scores["systems"]
    keys = metrics.METRIC_KEYS
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) + 0.4 * len(systems)), 4.0), dpi=100)
    for i, (name, values) in enumerate(systems.items()):
        xs = [k + (i - (len(systems) - 1) / 2) * width for k in range(len(keys))]
        ys = [values[k]["score"] for k in keys]
        errs = [values[k]["ci"] or 0.0 for k in keys]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=name, hatch="//" if name == "copy source" else None,
               alpha=0.85)
    ax.set_xticks(range(len(keys)), [metrics.LABELS[k] + (" (lower is better)" if k == "ter" else "") for k in keys],
                  fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
