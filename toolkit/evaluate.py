"""`toolkit eval TEST.tsv --out DIR`: translate a test set through a backend, score it beside the copy baseline.

Writes DIR/predictions.jsonl (one line per sentence, appended as batches finish, so an interrupted
eval resumes where it stopped), scores.json, report.md, scores.png and, last, manifest.json.
`toolkit eval --baseline copy` scores the copy-source baseline alone; `toolkit eval --compare RUN...`
puts earlier runs side by side with paired significance tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from toolkit import artifacts, backends, metrics, report, resources, runs
from toolkit.config import EvalConfig, PrepConfig, as_dict
from toolkit.decoding import LENGTH, REPETITION
from toolkit.errors import ArtifactError, DataError
from toolkit.prompt import PromptSpec

log = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
REPORT = "report.md"
CHART = "scores.png"
STATE = ".eval-state.json"  # config of an unfinished eval (a dot file: manifests skip it)
COPY = "copy source"
SORT_BATCHES = 4  # batches handed to the transformers backend per call (it sorts them by length)
TEST_FIX = "Fix the line: eval scores every row of a test set, so it skips none."


@dataclass(frozen=True)
class TestSet:
    path: Path
    lines: list[int]
    sources: list[str]
    references: list[str]
    source_column: str
    target_column: str
    direction: str


def read_test_set(path: Path, source_column: str, target_column: str, direction: str, limit: int = 0) -> TestSet:
    """The (first `limit`) pairs of a TSV with a header, of a prep split (`dev.jsonl`: the rows of
    `direction`, already oriented) or of recipe JSONL; `reverse` swaps source and reference otherwise."""
    from toolkit import corpus

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Pass a TSV test set with a header line (e.g. zh<TAB>nan).")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (prep --dev-fraction 0 writes an empty dev.jsonl). Pass a test set "
                        "of sentence pairs.")
    prep_cfg = PrepConfig(source_column=source_column, target_column=target_column)
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
        if '"direction"' in first and '"source"' in first:
            return _read_prep_split(path, direction, limit)
        pairs, source_column, target_column = corpus.read_jsonl(path, prep_cfg, Counter(), TEST_FIX), "user", "final"
    else:
        pairs = corpus.read_tsv(path, prep_cfg, Counter(), TEST_FIX)
    lines, sources, references = [], [], []
    for pair in pairs:
        lines.append(pair.line)
        sources.append(pair.source)
        references.append(pair.target)
        if limit and len(lines) >= limit:
            break
    if not lines:
        raise DataError(f"{path}: no sentence pairs after the header.")
    if direction == "reverse":
        sources, references = references, sources
        source_column, target_column = target_column, source_column
    return TestSet(path, lines, sources, references, source_column, target_column, direction)


def _read_prep_split(path: Path, direction: str, limit: int) -> TestSet:
    lines, sources, references = [], [], []
    with path.open(encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}). Re-run `toolkit prep`.") from None
            if row.get("direction") != direction:
                continue
            lines.append(row.get("line", number))
            sources.append(row["source"])
            references.append(row["target"])
            if limit and len(lines) >= limit:
                break
    if not lines:
        raise DataError(f"{path}: no {direction} examples. Pass --direction "
                        f"{'reverse' if direction == 'forward' else 'forward'} or another test file.")
    return TestSet(path, lines, sources, references, "source", "target", direction)


# ---- predictions ------------------------------------------------------------------------------

def load_predictions(path: Path, test: TestSet) -> list[dict[str, Any]]:
    """Rows already written by an interrupted eval; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    torn = False
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn = True
                log.warning("%s:%d: unreadable line dropped (the eval was interrupted while writing it)", path, number)
                break
            i = len(rows)
            if i >= len(test.sources) or row.get("source") != test.sources[i] \
                    or row.get("reference") != test.references[i]:
                raise ArtifactError(f"{path}:{number}: this prediction is not for row {i + 1} of {test.path}. "
                                    "The folder holds another eval: pass --force to start over.")
            rows.append(row)
    if torn:
        artifacts.atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def prediction_row(test: TestSet, i: int, hypothesis: str, **fields: Any) -> dict[str, Any]:
    return {"line": test.lines[i], "source": test.sources[i], "reference": test.references[i],
            "hypothesis": hypothesis, **fields}


def translate_all(load: Callable[[], Any], spec: PromptSpec, test: TestSet, path: Path,
                  cfg: EvalConfig) -> tuple[list[dict], str | None]:
    """Predictions for every row, resuming after those already in `path`; appended batch by batch.

    `load()` gives the translator; it is called only when sentences are left to translate. Returns the
    rows and the translator's name (None when nothing was left).
    """
    from tqdm import tqdm

    rows = load_predictions(path, test)
    if rows:
        log.info("eval: resuming after %d of %d sentences already in %s", len(rows), len(test.sources), path)
    if len(rows) == len(test.sources):
        return rows, None
    translator = load()
    with path.open("a", encoding="utf-8") as fh, tqdm(total=len(test.sources), initial=len(rows), desc="eval",
                                                       unit="sent", dynamic_ncols=True) as bar:
        # a translator that sorts what it is given by length (transformers) gets several batches at once
        chunk = cfg.batch_size * (SORT_BATCHES if getattr(translator, "sort", False) else 1)
        for start in range(len(rows), len(test.sources), chunk):
            batch = test.sources[start:start + chunk]
            try:
                results = translator.translate(batch, spec, max_new_tokens=cfg.max_new_tokens)
            except backends.PromptTooLong as exc:  # name the test set's line, not the index in a batch
                raise DataError(f"{test.path}:{test.lines[start + exc.index]}: {exc.reason}") from None
            if len(results) != len(batch):
                raise ArtifactError(f"backend {translator.name} returned {len(results)} translations for "
                                    f"{len(batch)} sentences")
            for j, t in enumerate(results):
                hint = {"hint": spec.hint_for(batch[j])} if spec.glossary else {}  # what the prompt carried
                row = prediction_row(test, start + j, t.text, analysis=t.analysis, complete=t.complete,
                                     tokens=t.tokens, limit=t.limit, stop=t.stop, latency_s=round(t.latency_s, 4),
                                     raw=t.raw, **hint)
                rows.append(row)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(batch))
    return rows, translator.name


# ---- scores -----------------------------------------------------------------------------------

def output_counts(rows: list[dict[str, Any]], reasoning_language: str | None) -> dict[str, Any]:
    """How the outputs looked: empty or truncated finals, outputs that ran to their token limit or were cut for
    repeating, analysis present, tokens, latency."""
    tokens = [r.get("tokens", 0) for r in rows]
    latency = sorted(r.get("latency_s", 0.0) for r in rows)
    counts = {
        "sentences": len(rows),
        "empty_final": sum(1 for r in rows if not r["hypothesis"]),
        "incomplete": sum(1 for r in rows if not r.get("complete", True)),
        "hit_limit": sum(1 for r in rows if r.get("stop") == LENGTH),
        "stopped_repetition": sum(1 for r in rows if r.get("stop") == REPETITION),
        "with_analysis": sum(1 for r in rows if r.get("analysis")),
        "tokens_mean": round(statistics.fmean(tokens), 2) if tokens else 0.0,
        "latency_p50_s": round(latency[len(latency) // 2], 4) if latency else 0.0,
        "latency_p95_s": round(latency[min(len(latency) - 1, int(0.95 * len(latency)))], 4) if latency else 0.0,
    }
    if reasoning_language:
        counts["reasoning_language"] = metrics.reasoning_compliance([r.get("analysis") for r in rows],
                                                                    reasoning_language)
    return counts


def score_systems(systems: dict[str, list[str]], test: TestSet, n_bootstrap: int) -> dict[str, Any]:
    """Scores of the copy baseline and every system, and each system's paired test against the copy."""
    copy = metrics.copy_hypotheses(test.sources)
    out: dict[str, Any] = {"systems": {COPY: metrics.score(copy, test.references, n_bootstrap=n_bootstrap)},
                           "paired_vs_copy": {}}
    for name, hyps in systems.items():
        out["systems"][name] = metrics.score(hyps, test.references, n_bootstrap=n_bootstrap)
    if n_bootstrap > 1:
        out["paired_vs_copy"] = metrics.paired_many(copy, systems, test.references, n_samples=n_bootstrap)
    return out


def summary(scores: dict[str, Any]) -> str:
    """One line per system: every metric beside the copy baseline's."""
    copy = scores["systems"][COPY]
    lines = []
    for name, values in scores["systems"].items():
        if name == COPY and len(scores["systems"]) > 1:
            continue
        cells = [f"{metrics.LABELS[k]} {values[k]['score']:.1f}" + ("" if name == COPY else
                 f" (copy {copy[k]['score']:.1f})") for k in metrics.METRIC_KEYS]
        lines.append(f"eval: {name}: " + ", ".join(cells))
    return "\n".join(lines)


# ---- the stage --------------------------------------------------------------------------------

def _start(out_dir: Path, config: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """prepare_out_dir, except that an unfinished eval with the same config is resumed, not refused."""
    state = out_dir / STATE
    resume = (not force and not (out_dir / artifacts.MANIFEST).is_file() and state.is_file()
              and json.loads(state.read_text(encoding="utf-8")) == config)
    done = artifacts.prepare_out_dir(out_dir, stage="eval", config=config, force=force, resume=resume)
    if done is None:
        artifacts.atomic_write_json(state, config)
    return done


def _finish(out_dir: Path, test: TestSet, scores: dict[str, Any], config: dict[str, Any], title: str,
            upstream: dict[str, Any] | None, inputs: list[Path], usage: resources.Usage,
            languages: tuple[str, str] | None = None) -> dict[str, Any]:
    """Write the scores, report and chart, then the manifest. `languages`: the (source, target) names the report
    uses (default: the prompt's in `scores`, else the test set's columns)."""
    artifacts.atomic_write_json(out_dir / SCORES, scores)
    languages = languages or report.languages(scores, (test.source_column, test.target_column))
    artifacts.atomic_write_text(out_dir / REPORT, report.markdown(scores, title=title, languages=languages))
    report.chart(scores, out_dir / CHART, title=title)
    manifest = artifacts.write_manifest(
        out_dir, stage="eval", config=config, inputs=inputs, upstream=upstream,
        metrics={**{name: {k: round(v[k]["score"], 2) for k in metrics.METRIC_KEYS}
                    for name, v in scores["systems"].items()}, "resources": usage.figures()},
    )
    (out_dir / STATE).unlink(missing_ok=True)
    log.info("%s", summary(scores))
    return manifest


def _title(test: TestSet) -> str:
    return f"{test.path.name}: {len(test.sources):,} sentences, {test.source_column} → {test.target_column}"


def run(cfg: EvalConfig, test_file: Path, out_dir: Path, *, force: bool = False, translator: Any = None,
        spec: PromptSpec | None = None) -> dict[str, Any]:
    """Evaluate `cfg.model` through `cfg.backend` on `test_file`; returns the manifest.

    `translator` and `spec` may be given (tests, callers holding a loaded model); else they are loaded
    from `cfg` and the model's manifests.
    """
    if cfg.model is None and translator is None:
        raise ArtifactError("no model to evaluate: pass --model, or --baseline copy for the baseline alone.")
    if cfg.backend is None:
        cfg = replace(cfg, backend=runs.default_backend(cfg.model or ""))
    test_file, out_dir = Path(test_file), Path(out_dir)
    model_manifest = runs.nearest_manifest(cfg.model) if cfg.model and cfg.backend != "ollama" else None
    spec = spec or backends.spec_for(cfg.backend, cfg.model or "")
    source_column, target_column = runs.prep_columns(model_manifest)
    test = read_test_set(test_file, cfg.source_column or source_column, cfg.target_column or target_column,
                         cfg.direction, cfg.limit)
    lexicon = _lexicon(cfg, source_column, target_column)
    if lexicon is not None and cfg.glossary_hints:
        spec = replace(spec, glossary=lexicon)
    spec = spec.for_direction(cfg.direction)
    config = {**as_dict(cfg), "test_file": str(test_file), "test_sha256": artifacts.sha256_file(test_file)}
    done = _start(out_dir, config, force)
    if done is not None:
        log.info("eval: %s already holds this evaluation; nothing to do (--force redoes it)", out_dir)
        return done
    usage = resources.Usage()

    def load() -> Any:
        try:
            return translator or backends.load_translator(cfg.backend, cfg.model, **cfg.translator_options(cfg.backend))
        except BaseException:
            if not (out_dir / PREDICTIONS).exists():  # nothing done yet: leave no folder that blocks a retry
                (out_dir / STATE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
            raise

    rows, loaded_name = translate_all(load, spec, test, out_dir / PREDICTIONS, cfg)
    name = f"{cfg.backend}:{Path(cfg.model).name if cfg.model else loaded_name or translator.name}"
    if cfg.copy_bias:
        name += f" (copy_bias {cfg.copy_bias:g})"  # a decoding setting: visible wherever the scores go
    hyps = [r["hypothesis"] for r in rows]
    scores = score_systems({name: hyps}, test, cfg.n_bootstrap)
    counts = output_counts(rows, spec.reasoning_language)
    counts["trained_with_analysis"] = trained_with_analysis(model_manifest)
    scores["outputs"] = {name: counts}
    if counts["hit_limit"] or counts["stopped_repetition"]:
        log.info("eval: %d of %d outputs ran to their token limit, %d were cut for repeating", counts["hit_limit"],
                 counts["sentences"], counts["stopped_repetition"])
    if lexicon is not None:
        hints = [spec.hint_entries(s) for s in test.sources] if cfg.glossary_hints else None
        scores["terms"] = _term_scores(lexicon.reversed() if cfg.direction == "reverse" else lexicon, test,
                                       {name: (hyps, hints)})
    scores["prompt"] = spec.describe()
    inputs = [test_file, *map(Path, cfg.glossary)]
    return _finish(out_dir, test, scores, config, _title(test), model_manifest, inputs, usage)


def _lexicon(cfg: EvalConfig, source_column: str, target_column: str) -> Any:
    """The eval's glossary, oriented as the model's forward direction (None without --glossary)."""
    if not cfg.glossary:
        return None
    from toolkit import glossary

    return glossary.load(cfg.glossary, cfg.source_column or source_column, cfg.target_column or target_column)


def _term_scores(lexicon: Any, test: TestSet, systems: dict[str, tuple[list[str], Any]]) -> dict[str, Any]:
    """Term accuracy of the copy baseline and each system (`lexicon` oriented as the test set)."""
    from toolkit.glossary import term_scores

    out = {COPY: term_scores(lexicon, test.sources, test.references, metrics.copy_hypotheses(test.sources))}
    for name, (hyps, hints) in systems.items():
        out[name] = term_scores(lexicon, test.sources, test.references, hyps, hints)
    return out


trained_with_analysis = runs.trained_with_analysis  # where it lived first


def baseline(cfg: EvalConfig, test_file: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """`toolkit eval --baseline copy`: the copy-source baseline alone (hypothesis = source sentence)."""
    test_file, out_dir = Path(test_file), Path(out_dir)
    test = read_test_set(test_file, cfg.source_column or "zh", cfg.target_column or "nan", cfg.direction, cfg.limit)
    config = {**as_dict(cfg), "baseline": "copy", "test_file": str(test_file),
              "test_sha256": artifacts.sha256_file(test_file)}
    done = _start(out_dir, config, force)
    if done is not None:
        log.info("eval: %s already holds this baseline; nothing to do (--force redoes it)", out_dir)
        return done
    usage = resources.Usage()
    rows = [prediction_row(test, i, src, analysis=None, complete=True, tokens=0, latency_s=0.0)
            for i, src in enumerate(test.sources)]
    artifacts.atomic_write_text(out_dir / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                for r in rows))
    scores = score_systems({}, test, cfg.n_bootstrap)
    lexicon = _lexicon(cfg, *runs.prep_columns(None))  # prep's default columns
    if lexicon is not None:
        scores["terms"] = _term_scores(lexicon.reversed() if cfg.direction == "reverse" else lexicon, test, {})
    return _finish(out_dir, test, scores, config, _title(test), None, [test_file, *map(Path, cfg.glossary)], usage)




def compare(run_dirs: list[Path], out_dir: Path, *, n_bootstrap: int = metrics.N_BOOTSTRAP,
            force: bool = False) -> dict[str, Any]:
    """`toolkit eval --compare RUN RUN...`: earlier evals of one test set side by side, each system tested
    against the copy baseline and against the first run's system."""
    out_dir = Path(out_dir)
    if not run_dirs:
        raise ArtifactError("--compare needs at least one eval folder (toolkit eval ... --out DIR).")
    runs = []
    for folder in map(Path, run_dirs):
        manifest = artifacts.read_manifest(folder, stage="eval")
        if "compare" in manifest["config"]:
            raise ArtifactError(f"{folder}: a comparison, not an eval run. Pass the folders `toolkit eval` wrote.")
        rows = [json.loads(line) for line in (folder / PREDICTIONS).read_text(encoding="utf-8").splitlines()]
        runs.append((folder, manifest, rows, json.loads((folder / SCORES).read_text(encoding="utf-8"))))
    first_folder, first_manifest, first_rows, _ = runs[0]
    for folder, _, rows, _ in runs[1:]:
        if [(r["source"], r["reference"]) for r in rows] != [(r["source"], r["reference"]) for r in first_rows]:
            raise DataError(f"{folder}: evaluated other sentences than {first_folder} (another test set, --limit "
                            "or --direction). Compare runs of the same test set.")
    cfg = first_manifest["config"]
    test = TestSet(Path(cfg["test_file"]), [r["line"] for r in first_rows], [r["source"] for r in first_rows],
                   [r["reference"] for r in first_rows], "source", "reference", cfg.get("direction", "forward"))
    systems: dict[str, list[str]] = {}
    outputs: dict[str, Any] = {}
    terms: dict[str, Any] = {}
    for folder, manifest, rows, old_scores in runs:
        if manifest["config"].get("baseline") == "copy":
            continue  # the copy baseline is in every comparison anyway
        name = f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name
        if name in systems:
            name = str(folder)
        systems[name] = [r["hypothesis"] for r in rows]
        outputs[name] = next(iter(old_scores.get("outputs", {}).values()), None) or output_counts(rows, None)
        own_terms = {k: v for k, v in (old_scores.get("terms") or {}).items() if k != COPY}
        if own_terms:
            terms[name] = next(iter(own_terms.values()))
    for *_, old_scores in runs:  # the copy baseline's term accuracy from the first run that scored it
        if COPY in (old_scores.get("terms") or {}):
            terms = {COPY: old_scores["terms"][COPY], **terms}
            break
    config = {"compare": [str(f) for f, *_ in runs], "n_bootstrap": n_bootstrap}
    done = artifacts.prepare_out_dir(out_dir, stage="eval", config=config, force=force)
    if done is not None:
        log.info("eval: %s already holds this comparison; nothing to do (--force redoes it)", out_dir)
        return done
    usage = resources.Usage()
    side_by_side = [{"line": test.lines[i], "source": test.sources[i], "reference": test.references[i],
                     "hypotheses": {name: hyps[i] for name, hyps in systems.items()}} for i in range(len(test.sources))]
    artifacts.atomic_write_text(out_dir / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                for r in side_by_side))
    scores = score_systems(systems, test, n_bootstrap)
    scores["outputs"] = outputs
    if terms:
        scores["terms"] = terms
    names = list(systems)
    if len(names) > 1 and n_bootstrap > 1:
        scores["first"] = names[0]
        scores["paired_vs_first"] = metrics.paired_many(systems[names[0]], {n: systems[n] for n in names[1:]},
                                                        test.references, n_samples=n_bootstrap)
    title = f"comparison of {len(runs)} runs, {len(test.sources):,} sentences of {test.path.name}"
    inputs = [f / name for f, *_ in runs for name in (PREDICTIONS, SCORES)]
    languages = next((report.languages(old, ("", "")) for *_, old in runs if old.get("prompt")), None)
    return _finish(out_dir, test, scores, config, title, None, inputs, usage, languages)
