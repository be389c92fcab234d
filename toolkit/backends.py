"""Translation backends shared by `toolkit eval` and `toolkit serve`: transformers, llama.cpp, Ollama.

Every backend builds the prompt the model was trained with (`PromptSpec`, read from the nearest
manifest), decodes greedily with a per-sentence token limit, and splits Harmony output into the final
answer and the analysis text (`harmony.parse`). For a model without Harmony tokens the generated text is
the answer, after a leading `<think>` analysis block when there is one (`prompt.split_analysis`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from toolkit import attention, harmony, runs
from toolkit.config import EVAL_BACKENDS, ollama_host
from toolkit.decoding import END, LENGTH, REPETITION, Decoding, trim
from toolkit.devices import resolve_device
from toolkit.errors import ArtifactError, ExternalToolError
from toolkit.prompt import PromptSpec, default_spec, from_manifest, is_harmony_tokenizer, split_analysis

log = logging.getLogger(__name__)
BACKENDS = EVAL_BACKENDS


@dataclass
class Translation:
    text: str  # final channel ("" when missing)
    analysis: str | None  # analysis channel, kept apart
    complete: bool  # final message ended properly (not truncated)
    tokens: int  # generated tokens
    latency_s: float
    raw: str  # raw generated text
    stop: str = END  # why generation ended: end (stop token), length (its token limit), repetition (a loop, cut)
    limit: int | None = None  # the sentence's token limit


class PromptTooLong(ExternalToolError):
    """A text whose prompt leaves no room for a reply in the model's context window (serve answers 413)."""

    def __init__(self, index: int, tokens: int, limit: int, setting: str) -> None:
        self.index, self.tokens, self.limit = index, tokens, limit
        self.reason = (f"its prompt is {tokens:,} tokens, and the context window ({setting}) holds {limit:,} tokens, "
                       f"the reply included: shorten the text, or raise {setting}.")
        super().__init__(f"text {index}: {self.reason}")


def plain_ids(text: str, encode: Callable[[str, bool], list[int]], forbidden: dict[int, str]) -> list[int]:
    """Token ids of `text` read as plain text: special-token strings unparsed, and no id of `forbidden`.

    `encode(text, special)` tokenizes with special-token strings parsed (True) or read as text (False). Some
    tokenizers match a few tokens even then: llama.cpp always matches "user-defined" tokens, and it makes
    `<|start|>`, `<|end|>`, `<|message|>`, `<|channel|>` of gpt-oss user-defined (so that they print). Such a
    token's string in the text is cut after its first character, and the pieces tokenized apart.
    """
    ids = encode(text, False)
    found = {forbidden[i] for i in ids if i in forbidden}
    cuts = sorted({m.start() + 1 for s in found for m in re.finditer(re.escape(s), text)} - {0, len(text)})
    if not cuts:
        return ids
    bounds = [0, *cuts, len(text)]
    return [i for start, end in itertools.pairwise(bounds) for i in plain_ids(text[start:end], encode, forbidden)]


def encode_prompt(pieces: list[tuple[str, bool]], encode: Callable[[str, bool], list[int]],
                  forbidden: dict[int, str] | None = None) -> list[int]:
    """Token ids of a prompt (`PromptSpec.prompt_pieces`) whose user text is tokenized as plain text (`plain_ids`).

    A user text whose plain ids are its ids with special strings parsed (it holds none, the normal case) leaves
    the prompt tokenized at once, exactly as in training; otherwise the pieces are tokenized apart, so no text
    can insert a control token (`<|end|><|start|>system...` would forge a turn).
    """
    plain = {piece: plain_ids(piece, encode, forbidden or {}) for piece, user in pieces if user}
    if all(encode(piece, True) == ids for piece, ids in plain.items()):
        return encode("".join(piece for piece, _ in pieces), True)
    return [i for piece, user in pieces for i in (plain[piece] if user else encode(piece, True))]


def check_fits(prompts: list[list[int]], limit: int | None, setting: str) -> None:
    """PromptTooLong for the first prompt that leaves no token of the `limit`-token context for the reply."""
    for i, ids in enumerate(prompts):
        if limit is not None and len(ids) >= limit:
            raise PromptTooLong(i, len(ids), limit, setting)


class Translator(Protocol):
    name: str

    def translate(self, texts: list[str], spec: PromptSpec, *, max_new_tokens: int = 256) -> list[Translation]: ...

    def health(self) -> bool: ...


def to_translation(raw: str, *, harmony_model: bool, stopped: bool, tokens: int, latency_s: float,
                   analysis: str | None = None, stop: str | None = None, limit: int | None = None) -> Translation:
    """One generated text -> Translation. `stopped`: generation ended on a stop token, not the length limit
    (`stop` says which other reason: length or repetition; default: end or length by `stopped`).

    Backends that strip the stop token from the text (llama.cpp, Ollama) pass `stopped` so a final
    message that ran to its stop token still counts as complete.
    """
    stop = stop or (END if stopped else LENGTH)
    if harmony_model:
        parsed = harmony.parse(raw)
        final, complete = parsed.final, parsed.complete or (stopped and parsed.final is not None)
        analysis = analysis or parsed.analysis
    else:  # a chat template: an analysis comes first, in a <think> block (`prompt.answer_with_analysis`)
        parsed_analysis, final, closed = split_analysis(raw)
        analysis, complete = analysis or parsed_analysis, stopped and closed
    return Translation(text=final or "", analysis=analysis or None, complete=complete, tokens=tokens,
                       latency_s=latency_s, raw=raw, stop=stop, limit=limit)


# ---- which prompt -------------------------------------------------------------------------------

def spec_for(backend: str, target: str | Path, *, manifest_dir: str | Path | None = None) -> PromptSpec:
    """The prompt the model at `target` was trained with, else the prep defaults (a bare base model).

    An Ollama model name has no folder: pass the export folder as `manifest_dir`.
    """
    manifest = runs.nearest_manifest(manifest_dir or target) if backend != "ollama" or manifest_dir else None
    if manifest is not None:
        try:
            return from_manifest(manifest)
        except ArtifactError:
            log.info("%s: manifest has no prep stage upstream; using the default prompt", target)
    return default_spec()


# ---- transformers -------------------------------------------------------------------------------

def _adapter_dir(path: Path) -> Path | None:
    """The adapter folder of a `toolkit train` folder, None for a model folder."""
    try:
        return runs.find_adapter(path)
    except ArtifactError:
        return None


def source_token_ids(ids: list[int]) -> list[int]:
    """The distinct token ids of a source sentence: what `copy_bias` favours at every decoding step."""
    return sorted(set(ids))


class _CopyBias:
    """A transformers logits processor adding `bias` to the scores of each row's source tokens (`ids[row]`,
    distinct: `source_token_ids`). One indexed add per decoding step: the (row, token) pairs go to the scores'
    device once, not one small tensor per row and step (200 host-to-device copies a step in a batch of 200)."""

    def __init__(self, ids: list[list[int]], bias: float) -> None:
        self.ids, self.bias = ids, bias
        self._index: tuple[Any, Any] | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._index is None or self._index[0].device != scores.device:
            rows = [row for row, ids in enumerate(self.ids) for _ in ids]
            cols = [tok for ids in self.ids for tok in ids]
            self._index = (torch.tensor(rows, dtype=torch.long, device=scores.device),
                           torch.tensor(cols, dtype=torch.long, device=scores.device))
        scores[self._index] += self.bias
        return scores


@contextlib.contextmanager
def _grouped_experts_in_decode(model: Any, rows: int):
    """Keep an MoE model's grouped-GEMM experts while `generate` decodes `rows` rows at once.

    On a GPU, transformers' generate switches `grouped_mm` experts to `batched_mm` for decoding
    (`_optimize_model_for_decode`): faster for a few rows, but batched_mm copies each row's selected expert
    matrices, so every layer and step reads rows x top_k expert matrices where grouped_mm reads each active
    expert once. gpt-oss-20b on an H200 (bench/results/translate_speed-2026-12-03-h200.md): at 128 rows
    batched_mm took 380 ms a step (53 % of it in that gather), grouped_mm 58 ms; at 8 rows batched_mm was 26 %
    faster. So the switch is left alone up to rows x top_k = 2 x experts (16 rows of gpt-oss-20b; the crossover
    between 8 and 128 rows is not measured) and for models without MoE experts.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(target.config, "text_config", None) or target.config
    top_k, experts = getattr(config, "num_experts_per_tok", 0), getattr(config, "num_local_experts", 0)
    if not (top_k and experts and rows * top_k > 2 * experts and hasattr(target, "_optimize_model_for_decode")):
        yield
        return
    target._optimize_model_for_decode = contextlib.nullcontext  # shadows the method: no switch for this call
    try:
        yield
    finally:
        del target._optimize_model_for_decode


class _RowStops:
    """A transformers stopping criterion that ends each row on its own: at a stop token, at the row's token
    limit, or at a repetition loop (`Decoding.repeat`); it records where and why each row ended."""

    def __init__(self, limits: list[int], stop_ids: list[int], decoding: Decoding) -> None:
        self.limits, self.stop_ids, self.repeat = limits, set(stop_ids), decoding.repeat
        self.out: list[list[int]] = [[] for _ in limits]
        self.why: list[str | None] = [None] * len(limits)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        for row, tok in enumerate(input_ids[:, -1].tolist()):
            if self.why[row] is not None:
                continue
            out = self.out[row]
            out.append(tok)
            if tok in self.stop_ids:
                self.why[row] = END
            elif (cut := self.repeat.cut(out)) is not None:
                del out[cut:]
                self.why[row] = REPETITION
            elif len(out) >= self.limits[row]:
                self.why[row] = LENGTH
        return torch.tensor([w is not None for w in self.why], dtype=torch.bool, device=input_ids.device)


class TransformersTranslator:
    """A base model, a merged folder, or base + LoRA adapter (a `toolkit train` folder); batched greedy decoding.

    A `translate` call's sentences are sorted by prompt length and token limit (so a batch pads little and its
    rows end close together), decoded `batch_size` at a time, each row stopped on its own (`_RowStops`), and
    returned in the order given. An adapter is merged into the base weights once at load (`merge_adapter`).
    `toolkit serve` decodes the requests that wait together as one call (`decodes_in_batches`, toolkit/batcher.py).
    """

    decodes_in_batches = True

    def __init__(self, target: str | Path, *, base_model: str | None = None, device: str | None = "auto",
                 dtype: str = "auto", batch_size: int = 32, copy_bias: float = 0.0,
                 decoding: Decoding | None = None, sort: bool = True, merge_adapter: bool = True,
                 generate_options: dict[str, Any] | None = None) -> None:
        path = Path(target)
        adapter = _adapter_dir(path) if path.is_dir() else None
        manifest = runs.nearest_manifest(path) if path.exists() else None
        if adapter is not None:
            base = runs.base_model_of(manifest or {}, adapter, base_model)
        else:
            base = str(target)
        if path.is_dir() and adapter is None and not (path / "config.json").is_file():
            raise ArtifactError(f"{target}: expected a model folder (config.json) or a train folder "
                                "(adapter_config.json); found neither. Pass --model.")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(device)
        tok_source = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
        except OSError as exc:  # not a folder and not reachable on the Hub
            raise ArtifactError(f"{tok_source}: cannot load a tokenizer ({str(exc).splitlines()[0]}). "
                                "Pass a local model folder with --model.") from exc
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device == "cuda":
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
            if merge_adapter:  # W + BA once, instead of two extra matmuls per adapted layer at every step
                model = model.merge_and_unload()
        if device != "cuda":
            model = model.to(device)
        self._setup(model, tokenizer, name=str(target), device=device, batch_size=batch_size, copy_bias=copy_bias,
                    decoding=decoding, sort=sort, generate_options=generate_options,
                    analysis=runs.trained_with_analysis(manifest))

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, name: str, device: str, merge_adapter: bool = True,
                   **options: Any) -> TransformersTranslator:
        """A translator around a model already in memory (benchmarks with random weights)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, name=name, device=device, **options)
        return self

    def _setup(self, model: Any, tokenizer: Any, *, name: str, device: str, batch_size: int = 32,
               copy_bias: float = 0.0, decoding: Decoding | None = None, sort: bool = True,
               generate_options: dict[str, Any] | None = None, analysis: bool = False) -> None:
        self.name, self.device, self.batch_size, self.copy_bias = name, device, batch_size, copy_bias
        self.decoding = decoding or Decoding()
        self.sort = sort
        self.generate_options = dict(generate_options or {})
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.eval()
        # A left-padded batch under CUDA SDPA: pad rows attend to nothing and return NaN, which spreads to every
        # padded row (toolkit.attention); the padding-safe mask keeps each row what it is alone.
        attention.use_for(self.model)
        self.harmony = is_harmony_tokenizer(self.tokenizer)
        # Room for an analysis before the answer: Harmony's analysis channel, or the <think> block of a chat
        # template model whose prep wrote analyses (`runs.trained_with_analysis`).
        self.analysis = self.harmony or analysis
        vocab = self.tokenizer.get_vocab()
        self.forbidden = {vocab[t]: t for t in (*harmony.SPECIAL_TOKENS, *self.tokenizer.all_special_tokens)
                          if t in vocab}
        stops = [self.tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS] if self.harmony else []
        eos = self.tokenizer.eos_token_id
        self.stop_ids = sorted({i for i in [*stops, *(eos if isinstance(eos, list) else [eos])]
                                if isinstance(i, int) and i >= 0})

    def health(self) -> bool:
        return self.model is not None

    def _encode(self, text: str, special: bool) -> list[int]:
        # The prompt text holds the template's special tokens (BOS included where it has one): add none.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]

    def prompt_ids(self, text: str, spec: PromptSpec) -> list[int]:
        """The prompt's token ids, the user's text tokenized as plain text (see `encode_prompt`)."""
        return encode_prompt(spec.prompt_pieces(text, self.tokenizer), self._encode, self.forbidden)

    def translate(self, texts: list[str], spec: PromptSpec, *, max_new_tokens: int = 256) -> list[Translation]:
        prompts = [self.prompt_ids(t, spec) for t in texts]
        context = getattr(self.model.config, "max_position_embeddings", None)
        check_fits(prompts, context, "the model's max_position_embeddings")
        sources = [plain_ids(t, self._encode, self.forbidden) for t in texts]
        limits = [self.decoding.limit(len(src), max_new_tokens, analysis=self.analysis,
                                      room=None if context is None else context - len(ids))
                  for src, ids in zip(sources, prompts, strict=True)]
        order = list(range(len(texts)))
        if self.sort:
            order.sort(key=lambda i: (len(prompts[i]), limits[i]))
        out: list[Translation | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            results = self._batch([prompts[i] for i in rows], [sources[i] for i in rows], [limits[i] for i in rows])
            for i, result in zip(rows, results, strict=True):
                out[i] = result
        return out  # type: ignore[return-value]

    def _batch(self, prompts: list[list[int]], sources: list[list[int]], limits: list[int]) -> list[Translation]:
        import torch
        from transformers import StoppingCriteriaList

        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.model.device)
        extra: dict[str, Any] = dict(self.generate_options)
        if self.copy_bias:
            from transformers import LogitsProcessorList

            ids = [source_token_ids(src) for src in sources]
            extra["logits_processor"] = LogitsProcessorList([_CopyBias(ids, self.copy_bias)])
        stops = _RowStops(limits, self.stop_ids, self.decoding)
        started = time.perf_counter()
        with torch.inference_mode(), _grouped_experts_in_decode(self.model, len(prompts)):
            self.model.generate(
                **enc, max_new_tokens=max(limits), do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stops]), **extra,
            )
        # Batched: each sentence is charged an equal share of its batch's wall time.
        latency = (time.perf_counter() - started) / len(prompts)
        results = []
        for ids, why, limit in zip(stops.out, stops.why, limits, strict=True):
            raw = self.tokenizer.decode(ids, skip_special_tokens=not self.harmony)
            results.append(to_translation(raw, harmony_model=self.harmony, stopped=why == END, tokens=len(ids),
                                          latency_s=latency, stop=why or LENGTH, limit=limit))
        return results


# ---- llama.cpp ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _compiled_template(source: str) -> Any:
    """A chat template compiled once (3 ms for Gemma 3's; rendering it takes 0.02 ms, twice per prompt)."""
    import jinja2.sandbox

    return jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)


class _GGUFTemplate:
    """The chat template stored in a GGUF, with `apply_chat_template` so `PromptSpec.render_prompt` can use it."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.template = llm.metadata.get("tokenizer.chat_template")

    def get_vocab(self) -> dict[str, int]:
        return {}

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        if not self.template:
            raise ArtifactError("the GGUF has no tokenizer.chat_template and no Harmony tokens: cannot build "
                                "the prompt. Export it with `toolkit export`.")
        detok = self.llm.detokenize
        return _compiled_template(self.template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=detok([self.llm.token_bos()], special=True).decode("utf-8", "replace"),
            eos_token=detok([self.llm.token_eos()], special=True).decode("utf-8", "replace"),
        )


class LlamaCppTranslator:
    """A GGUF file through llama-cpp-python; one sentence at a time, greedy."""

    def __init__(self, target: str | Path, *, n_ctx: int = 2048, n_gpu_layers: int = 0, n_threads: int | None = None,
                 n_batch: int = 512, seed: int = 0, copy_bias: float = 0.0, decoding: Decoding | None = None) -> None:
        path = Path(target)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such GGUF file. Run `toolkit export` or pass --model FILE.gguf.")
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ExternalToolError("llama-cpp-python is not installed: `pip install 'toolkit[export]'`.") from exc
        self.name = path.name
        self.copy_bias = copy_bias
        self.decoding = decoding or Decoding()
        self.llm = Llama(model_path=str(path), logits_all=False, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                         n_threads=n_threads, n_threads_batch=n_threads, n_batch=min(n_batch, n_ctx), seed=seed,
                         verbose=False)
        self.harmony = self._token_id("<|channel|>") is not None
        specials = {t: self._token_id(t) for t in harmony.SPECIAL_TOKENS} if self.harmony else {}
        self.forbidden = {i: t for t, i in specials.items() if i is not None}
        self.stop_ids = {self.llm.token_eos()}
        if self.harmony:
            self.stop_ids |= {self._token_id(t) for t in harmony.STOP_TOKENS} - {None}
        self.template = None if self.harmony else _GGUFTemplate(self.llm)
        # Room for an analysis before the answer (see TransformersTranslator._setup).
        self.analysis = self.harmony or runs.trained_with_analysis(runs.nearest_manifest(path))

    def _token_id(self, text: str) -> int | None:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def health(self) -> bool:
        return self.llm is not None

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def prompt_ids(self, text: str, spec: PromptSpec) -> list[int]:
        """The prompt's token ids, the user's text tokenized as plain text (see `encode_prompt`)."""
        return encode_prompt(spec.prompt_pieces(text, None if self.harmony else self.template), self._encode,
                             self.forbidden)

    def translate(self, texts: list[str], spec: PromptSpec, *, max_new_tokens: int = 256) -> list[Translation]:
        prompts = [self.prompt_ids(text, spec) for text in texts]
        check_fits(prompts, self.llm.n_ctx(), "n_ctx")  # every text of a batch, before any is generated
        return [self._one(text, tokens, max_new_tokens) for text, tokens in zip(texts, prompts, strict=True)]

    def logits_processors(self, text: str, n_prompt: int) -> list[Any] | None:
        """llama-cpp logits processors for one source sentence (`copy_bias`). Each is called with the token ids
        so far (the prompt's `n_prompt` first) and the next token's scores, and returns the scores."""
        if not self.copy_bias:
            return None
        ids = source_token_ids(plain_ids(text, self._encode, self.forbidden))

        def favour_source(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += self.copy_bias
            return scores

        return [favour_source]

    def _one(self, text: str, tokens: list[int], max_new_tokens: int) -> Translation:
        source = plain_ids(text, self._encode, self.forbidden)
        limit = self.decoding.limit(len(source), max_new_tokens, analysis=self.analysis,
                                    room=self.llm.n_ctx() - len(tokens))  # > 0: `check_fits` passed
        processors = self.logits_processors(text, len(tokens))
        started = time.perf_counter()
        out: list[int] = []
        why = LENGTH
        for tok in self.llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True, logits_processor=processors):
            out.append(tok)
            if tok in self.stop_ids:
                why = END
                break
            if (cut := self.decoding.repeat.cut(out)) is not None:
                del out[cut:]
                why = REPETITION
                break
            if len(out) >= limit:
                break
        latency = time.perf_counter() - started
        # special=True keeps <|channel|>, <|message|>... in the text so the Harmony parser sees them.
        raw = self.llm.detokenize(out, special=self.harmony).decode("utf-8", errors="replace")
        return to_translation(raw, harmony_model=self.harmony, stopped=why == END, tokens=len(out),
                              latency_s=latency, stop=why, limit=limit)


# ---- Ollama -------------------------------------------------------------------------------------

class OllamaTranslator:
    """A model on an Ollama server. The prompt is sent raw, so it is exactly the Harmony prompt of training."""

    def __init__(self, target: str, *, host: str | None = None, timeout: float = 120.0, check: bool = True,
                 keep_alive: str | None = None, decoding: Decoding | None = None) -> None:
        from ollama import Client

        self.name = str(target)
        self.decoding = decoding or Decoding()
        self._codec: tuple[Callable[[str], list[Any]], Callable[[list[Any]], str]] | None = None
        self.host = host or ollama_host()
        self.keep_alive = keep_alive
        self.client = Client(host=self.host, timeout=timeout)
        if check and not self.health():
            raise ExternalToolError(f"Ollama at {self.host}: no server answers. Start it with `ollama serve` "
                                    "or pass --host.")

    def health(self) -> bool:
        import httpx
        from ollama import ResponseError

        try:
            self.client.list()
        except (ConnectionError, httpx.HTTPError, ResponseError):  # refused, timed out, HTTP error: not usable now
            return False
        return True

    def translate(self, texts: list[str], spec: PromptSpec, *, max_new_tokens: int = 256) -> list[Translation]:
        return [self._one(text, spec, max_new_tokens) for text in texts]

    def _tokenizer(self) -> tuple[Callable[[str], list[Any]], Callable[[list[Any]], str]]:
        """(encode, decode) in gpt-oss tokens (Ollama serves Harmony models only, and its API tokenizes nothing for
        us), or in characters when the o200k ranks are not installed."""
        if self._codec is None:
            try:
                from toolkit.tokenizer import tiktoken_encoding

                encoding = tiktoken_encoding()
                self._codec = (lambda t: encoding.encode(t, allowed_special="all"), encoding.decode)
            except ExternalToolError as exc:
                log.warning("Ollama: %s; token limits count characters", exc)
                self._codec = (list, "".join)
        return self._codec

    def _one(self, text: str, spec: PromptSpec, max_new_tokens: int) -> Translation:
        from ollama import ResponseError

        # Ollama takes one limit per request (num_predict); a loop is cut from the reply afterwards.
        encode, decode = self._tokenizer()
        limit = self.decoding.limit(len(encode(text)), max_new_tokens, analysis=True)
        options = {"temperature": 0.0, "top_k": 1, "num_predict": limit, "stop": list(harmony.STOP_TOKENS)}
        started = time.perf_counter()
        try:
            # Ollama tokenizes the whole raw prompt with special tokens parsed: defuse any in the user's text and
            # in the glossary hint (user text too), which goes in the developer message as in training.
            hint = spec.hint_for(text)
            prompt = spec.harmony_prompt(harmony.defuse_specials(text), hint and harmony.defuse_specials(hint))
            resp = self.client.generate(model=self.name, prompt=prompt, raw=True, options=options,
                                        keep_alive=self.keep_alive)
        except ConnectionError as exc:
            raise ExternalToolError(f"Ollama at {self.host}: no server answers ({exc}). Start it with "
                                    "`ollama serve` or pass --host.") from exc
        except ResponseError as exc:
            hint = f" Create it with `ollama create {self.name} -f Modelfile`." if exc.status_code == 404 else ""
            raise ExternalToolError(f"Ollama model {self.name!r} at {self.host}: {exc.error} "
                                    f"(HTTP {exc.status_code}).{hint}") from exc
        latency = time.perf_counter() - started
        raw, why = resp.response or "", END if resp.done_reason == "stop" else LENGTH
        if self.decoding.repeat.max_ngram:
            ids, looped = trim(encode(raw), self.decoding.repeat)
            if looped:
                raw, why = decode(ids), REPETITION
        # A server that parses Harmony itself returns the analysis as `thinking` and only the final text.
        return to_translation(raw, harmony_model=True, stopped=why == END, tokens=resp.eval_count or 0,
                              latency_s=latency, analysis=resp.thinking, stop=why, limit=limit)


def load_translator(backend: str, target: str | Path, **options: Any) -> Translator:
    """A ready translator. backend: transformers (model folder / hub id / train folder), llama-cpp (GGUF
    path), ollama (model name; option host=)."""
    if backend == "transformers":
        return TransformersTranslator(target, **options)
    if backend == "llama-cpp":
        return LlamaCppTranslator(target, **options)
    if backend == "ollama":
        return OllamaTranslator(str(target), **options)
    raise ArtifactError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}.")
