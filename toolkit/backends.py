"""Translation backends shared by `toolkit eval` and `toolkit serve`: transformers, llama.cpp, Ollama.

Every backend builds the prompt the model was trained with (`PromptSpec`, read from the nearest
manifest), decodes greedily with a per-sentence token limit, and splits Harmony output into the final
answer and the analysis text (`harmony.parse`). For a model without Harmony tokens the generated text is
the answer, after a leading `<think>` analysis block when there is one (`prompt.split_analysis`).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from toolkit import harmony, runs
from toolkit.config import EVAL_BACKENDS, ollama_host
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
                   analysis: str | None = None) -> Translation:
    """One generated text -> Translation. `stopped`: generation ended on a stop token, not the length limit.

    Backends that strip the stop token from the text (llama.cpp, Ollama) pass `stopped` so a final
    message that ran to its stop token still counts as complete.
    """
    if harmony_model:
        parsed = harmony.parse(raw)
        final, complete = parsed.final, parsed.complete or (stopped and parsed.final is not None)
        analysis = analysis or parsed.analysis
    else:  # a chat template: an analysis comes first, in a <think> block (`prompt.answer_with_analysis`)
        parsed_analysis, final, closed = split_analysis(raw)
        analysis, complete = analysis or parsed_analysis, stopped and closed
    return Translation(text=final or "", analysis=analysis or None, complete=complete, tokens=tokens,
                       latency_s=latency_s, raw=raw)


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
    """A transformers logits processor adding `bias` to the scores of each row's source tokens."""

    def __init__(self, ids: list[list[int]], bias: float) -> None:
        self.ids, self.bias = ids, bias

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for row, ids in enumerate(self.ids):
            scores[row, torch.tensor(ids, dtype=torch.long, device=scores.device)] += self.bias
        return scores


class TransformersTranslator:
    """A base model, a merged folder, or base + LoRA adapter (a `toolkit train` folder); batched greedy decoding."""

    def __init__(self, target: str | Path, *, base_model: str | None = None, device: str | None = "auto",
                 dtype: str = "auto", batch_size: int = 8, copy_bias: float = 0.0) -> None:
        path = Path(target)
        adapter = _adapter_dir(path) if path.is_dir() else None
        if adapter is not None:
            base = runs.base_model_of(runs.nearest_manifest(path) or {}, adapter, base_model)
        else:
            base = str(target)
        if path.is_dir() and adapter is None and not (path / "config.json").is_file():
            raise ArtifactError(f"{target}: expected a model folder (config.json) or a train folder "
                                "(adapter_config.json); found neither. Pass --model.")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.name = str(target)
        self.batch_size = batch_size
        self.copy_bias = copy_bias
        tok_source = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
        except OSError as exc:  # not a folder and not reachable on the Hub
            raise ArtifactError(f"{tok_source}: cannot load a tokenizer ({str(exc).splitlines()[0]}). "
                                "Pass a local model folder with --model.") from exc
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.device == "cuda":
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        if self.device != "cuda":
            model = model.to(self.device)
        self.model = model.eval()
        self.harmony = is_harmony_tokenizer(self.tokenizer)
        vocab = self.tokenizer.get_vocab()
        self.forbidden = {vocab[t]: t for t in (*harmony.SPECIAL_TOKENS, *self.tokenizer.all_special_tokens)
                          if t in vocab}
        stops = [self.tokenizer.convert_tokens_to_ids(t) for t in harmony.STOP_TOKENS] if self.harmony else []
        eos = self.tokenizer.eos_token_id
        self.stop_ids = sorted({i for i in [*stops, eos] if isinstance(i, int) and i >= 0})

    def health(self) -> bool:
        return self.model is not None

    def _encode(self, text: str, special: bool) -> list[int]:
        # The prompt text holds the template's special tokens (BOS included where it has one): add none.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]

    def prompt_ids(self, text: str, spec: PromptSpec) -> list[int]:
        """The prompt's token ids, the user's text tokenized as plain text (see `encode_prompt`)."""
        return encode_prompt(spec.prompt_pieces(text, self.tokenizer), self._encode, self.forbidden)

    def translate(self, texts: list[str], spec: PromptSpec, *, max_new_tokens: int = 256) -> list[Translation]:
        out: list[Translation] = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(self._batch(texts[start:start + self.batch_size], spec, max_new_tokens))
        return out

    def _batch(self, texts: list[str], spec: PromptSpec, max_new_tokens: int) -> list[Translation]:
        import torch

        prompts = [self.prompt_ids(t, spec) for t in texts]
        check_fits(prompts, getattr(self.model.config, "max_position_embeddings", None),
                   "the model's max_position_embeddings")
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.model.device)
        extra: dict[str, Any] = {}
        if self.copy_bias:
            from transformers import LogitsProcessorList

            ids = [source_token_ids(plain_ids(t, self._encode, self.forbidden)) for t in texts]
            extra["logits_processor"] = LogitsProcessorList([_CopyBias(ids, self.copy_bias)])
        started = time.perf_counter()
        with torch.inference_mode():
            generated = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id, **extra,
            )
        # Batched: each sentence is charged an equal share of its batch's wall time.
        latency = (time.perf_counter() - started) / len(texts)
        results = []
        for row in generated[:, enc["input_ids"].shape[1]:].tolist():
            stop_at = next((i for i, tok in enumerate(row) if tok in self.stop_ids), None)
            ids = row if stop_at is None else row[: stop_at + 1]
            raw = self.tokenizer.decode(ids, skip_special_tokens=False)
            if not self.harmony:
                raw = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(to_translation(raw, harmony_model=self.harmony, stopped=stop_at is not None,
                                          tokens=len(ids), latency_s=latency))
        return results


# ---- llama.cpp ----------------------------------------------------------------------------------

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
        import jinja2

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        detok = self.llm.detokenize
        return env.from_string(self.template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=detok([self.llm.token_bos()], special=True).decode("utf-8", "replace"),
            eos_token=detok([self.llm.token_eos()], special=True).decode("utf-8", "replace"),
        )


class LlamaCppTranslator:
    """A GGUF file through llama-cpp-python; one sentence at a time, greedy."""

    def __init__(self, target: str | Path, *, n_ctx: int = 2048, n_gpu_layers: int = 0, n_threads: int | None = None,
                 seed: int = 0, copy_bias: float = 0.0) -> None:
        path = Path(target)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such GGUF file. Run `toolkit export` or pass --model FILE.gguf.")
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ExternalToolError("llama-cpp-python is not installed: `pip install 'toolkit[export]'`.") from exc
        self.name = path.name
        self.copy_bias = copy_bias
        self.llm = Llama(model_path=str(path), logits_all=False, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                         n_threads=n_threads, n_threads_batch=n_threads, seed=seed, verbose=False)
        self.harmony = self._token_id("<|channel|>") is not None
        specials = {t: self._token_id(t) for t in harmony.SPECIAL_TOKENS} if self.harmony else {}
        self.forbidden = {i: t for t, i in specials.items() if i is not None}
        self.stop_ids = {self.llm.token_eos()}
        if self.harmony:
            self.stop_ids |= {self._token_id(t) for t in harmony.STOP_TOKENS} - {None}
        self.template = None if self.harmony else _GGUFTemplate(self.llm)

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
        budget = min(max_new_tokens, self.llm.n_ctx() - len(tokens))  # > 0: `check_fits` passed
        processors = self.logits_processors(text, len(tokens))
        started = time.perf_counter()
        out: list[int] = []
        stopped = False
        for tok in self.llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True, logits_processor=processors):
            out.append(tok)
            if tok in self.stop_ids:
                stopped = True
                break
            if len(out) >= budget:
                break
        latency = time.perf_counter() - started
        # special=True keeps <|channel|>, <|message|>... in the text so the Harmony parser sees them.
        raw = self.llm.detokenize(out, special=self.harmony).decode("utf-8", errors="replace")
        return to_translation(raw, harmony_model=self.harmony, stopped=stopped, tokens=len(out), latency_s=latency)


# ---- Ollama -------------------------------------------------------------------------------------

class OllamaTranslator:
    """A model on an Ollama server. The prompt is sent raw, so it is exactly the Harmony prompt of training."""

    def __init__(self, target: str, *, host: str | None = None, timeout: float = 120.0, check: bool = True,
                 keep_alive: str | None = None) -> None:
        from ollama import Client

        self.name = str(target)
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

    def _one(self, text: str, spec: PromptSpec, max_new_tokens: int) -> Translation:
        from ollama import ResponseError

        options = {"temperature": 0.0, "top_k": 1, "num_predict": max_new_tokens, "stop": list(harmony.STOP_TOKENS)}
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
        raw = resp.response or ""
        # A server that parses Harmony itself returns the analysis as `thinking` and only the final text.
        return to_translation(raw, harmony_model=True, stopped=resp.done_reason == "stop",
                              tokens=resp.eval_count or 0, latency_s=latency, analysis=resp.thinking)


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
