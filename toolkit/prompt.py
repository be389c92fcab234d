"""The translation prompt a model was trained with, recovered from a stage manifest.

Training, evaluation and serving must all build the same prompt: this is that one place. The prep
manifest (reachable from every later manifest through its `upstream` chain) records the language
names, instruction template, `reasoning language`, reasoning effort and date, and the chat format the
examples were written for: `harmony` (gpt-oss; the system message starts with `reasoning language: X`) or
`template` (a chat template without a reasoning channel, such as Gemma's: the instruction alone, since
such a model only echoes the line). A prep manifest older than that record wrote the line for every model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from toolkit import harmony, runs
from toolkit.glossary import DEFAULT_HINT_TEMPLATE

# Stands in for the user's text while the scaffold of a prompt is rendered (a private-use code point: no
# tokenizer, template or sentence has a reason to hold it).
USER_SLOT = "\ue000user-text\ue000"
AUTO = "\ue000auto\ue000"  # hint=AUTO: the hint of the spec's glossary for the text

# Chat formats without an analysis channel (every one but Harmony) get the analysis inside the answer, in the
# <think> block reasoning models use; backends split it off again (`split_analysis`).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class PromptSpec:
    source_name: str
    target_name: str
    instruction: str  # template with {src} and {tgt}
    reasoning_language: str
    reasoning_effort: str = "low"
    date: str = harmony.DEFAULT_DATE
    hint_template: str = DEFAULT_HINT_TEMPLATE  # as prep wrote the training hints
    hint_max_terms: int = 8
    glossary: Any = field(default=None, compare=False, repr=False)  # a glossary.Glossary, source -> target
    # The `reasoning language` line in the system message: True / False as the prep manifest says, None (a
    # bare base model) for Harmony prompts only.
    reasoning_line: bool | None = None

    def reversed(self) -> PromptSpec:
        return replace(self, source_name=self.target_name, target_name=self.source_name,
                       glossary=self.glossary.reversed() if self.glossary is not None else None)

    def for_direction(self, direction: str) -> PromptSpec:
        """`forward` (source->target as prepared) or `reverse`."""
        return self.reversed() if direction == "reverse" else self

    def describe(self) -> dict[str, Any]:
        """The spec as JSON (the glossary by its size)."""
        out = asdict(replace(self, glossary=None))
        out["glossary"] = len(self.glossary) if self.glossary is not None else None
        return out

    def hint_entries(self, text: str) -> list[tuple[str, list[str]]]:
        """The glossary entries a hint for `text` shows: those whose term is in it (longest first, no overlaps)."""
        if not self.glossary:
            return []
        return self.glossary.entries_in(text)[:self.hint_max_terms]

    def hint_for(self, text: str) -> str | None:
        from toolkit.glossary import hint_text

        return hint_text(self.hint_entries(text), self.hint_template)

    def messages(self, text: str, target: str | None = None, thinking: str | None = None,
                 hint: str | None = None, *, harmony_format: bool = True) -> list[dict[str, Any]]:
        """The chat messages; `harmony_format`: whether they are rendered as Harmony (decides the reasoning line
        when `reasoning_line` is None)."""
        instruction = self.instruction.format(src=self.source_name, tgt=self.target_name)
        if hint:
            instruction = f"{instruction}\n\n{hint}"
        line = harmony_format if self.reasoning_line is None else self.reasoning_line
        return harmony.build_messages(
            text, reasoning_language=self.reasoning_language if line else None, instruction=instruction,
            target=target, thinking=thinking,
        )

    def _hint(self, text: str, hint: str | None) -> str | None:
        return self.hint_for(text) if hint == AUTO else hint

    def harmony_prompt(self, text: str, hint: str | None = AUTO) -> str:
        """Harmony text up to `<|start|>assistant`, ready for generation (with the glossary's hint for `text`)."""
        return harmony.render(
            self.messages(text, hint=self._hint(text, hint)), reasoning_effort=self.reasoning_effort, date=self.date,
            add_generation_prompt=True,
        )

    def render_prompt(self, text: str, tokenizer: Any = None, hint: str | None = AUTO) -> str:
        """The generation prompt in the model's chat format: Harmony, or the tokenizer's own template."""
        hint = self._hint(text, hint)
        if tokenizer is None or is_harmony_tokenizer(tokenizer):
            return self.harmony_prompt(text, hint)
        return tokenizer.apply_chat_template(
            template_messages(self.messages(text, hint=hint, harmony_format=False)), tokenize=False,
            add_generation_prompt=True
        )

    def prompt_pieces(self, text: str, tokenizer: Any = None) -> list[tuple[str, bool]]:
        """`render_prompt` split into (piece, is_user_text): the scaffold, whose special tokens are real, and the
        user's text and glossary hint, which a backend must tokenize as plain text (else `<|end|><|start|>system...`
        in a text or a glossary entry would forge a turn). The pieces join to exactly `render_prompt(text,
        tokenizer)`."""
        hint = self.hint_for(text)
        pieces = self._text_pieces(text, tokenizer, hint)
        if hint:  # the hint sits verbatim in the scaffold (the system message): cut it out as user text
            pieces = [part for piece, user in pieces
                      for part in ([(piece, user)] if user else _cut(piece, hint))]
        return [(piece, user) for piece, user in pieces if piece]

    def _text_pieces(self, text: str, tokenizer: Any, hint: str | None) -> list[tuple[str, bool]]:
        prompt = self.render_prompt(text, tokenizer, hint)
        slots = self.render_prompt(USER_SLOT, tokenizer, hint).split(USER_SLOT)
        if len(slots) == 2 and prompt.startswith(slots[0]) and prompt.endswith(slots[1]) \
                and len(prompt) >= len(slots[0]) + len(slots[1]):  # the text as the template wrote it (trimmed...)
            head, tail = slots
            pieces = [(head, False), (prompt[len(head):len(prompt) - len(tail)], True), (tail, False)]
        else:  # a template that repeats the text: every slot holds it
            pieces = [(slots[0], False)]
            for part in slots[1:]:
                pieces += [(text, True), (part, False)]
        return pieces


def _cut(piece: str, hint: str) -> list[tuple[str, bool]]:
    parts = piece.split(hint)
    out = [(parts[0], False)]
    for part in parts[1:]:
        out += [(hint, True), (part, False)]
    return out


def answer_with_analysis(analysis: str | None, answer: str) -> str:
    """The assistant's answer for a chat template without an analysis channel: the analysis in a <think> block,
    then the answer (as reasoning models such as Qwen3 and DeepSeek-R1 write it)."""
    if not analysis:
        return answer
    return f"{THINK_OPEN}\n{analysis}\n{THINK_CLOSE}\n\n{answer}"


def split_analysis(text: str) -> tuple[str | None, str, bool]:
    """(analysis, answer, closed) of a generated answer: a leading <think> block is the analysis (closed False
    while it is still open: the answer is then empty); anything else is the answer alone."""
    stripped = text.strip()
    if not stripped.startswith(THINK_OPEN):
        return None, stripped, True
    body = stripped[len(THINK_OPEN):]
    analysis, sep, answer = body.partition(THINK_CLOSE)
    return analysis.strip() or None, answer.strip(), bool(sep)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a non-Harmony chat template: no `thinking` key (templates differ on it)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


HARMONY_MARKERS = ("<|channel|>", "<|message|>")


def is_harmony_tokenizer(tokenizer: Any) -> bool:
    """True for gpt-oss tokenizers (they carry the Harmony special tokens).

    Two token look-ups, not `get_vocab()`: that builds a dict of the whole vocabulary (0.16 s for Gemma 3's
    262k tokens), and this runs twice for every prompt: it cost 500 sentences of a batched GPU eval 160 s.
    """
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        unk = getattr(tokenizer, "unk_token_id", None)
        return all((tid := convert(token)) is not None and tid != unk for token in HARMONY_MARKERS)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return all(token in vocab for token in HARMONY_MARKERS)


def from_manifest(manifest: dict[str, Any]) -> PromptSpec:
    """The PromptSpec of any stage manifest (prep, train, merge, export)."""
    cfg = runs.prep_manifest(manifest)["config"]
    return PromptSpec(
        source_name=cfg["source_name"],
        target_name=cfg["target_name"],
        instruction=cfg["instruction"],
        reasoning_language=cfg["reasoning_language"],
        reasoning_effort=cfg["reasoning_effort"],
        date=cfg["date"],
        hint_template=cfg.get("hint_template", DEFAULT_HINT_TEMPLATE),
        hint_max_terms=cfg.get("glossary_hint_max_terms", 8),
        # a prep manifest without the record wrote the line for every model: its models were trained with it
        reasoning_line=cfg.get("chat_format", "harmony") == "harmony",
    )


def prep_spec(cfg: Any) -> PromptSpec:
    """The PromptSpec `toolkit prep` writes its examples with (a PrepConfig)."""
    return PromptSpec(cfg.source_name, cfg.target_name, cfg.instruction, cfg.reasoning_language,
                      cfg.reasoning_effort, cfg.date, cfg.hint_template, cfg.glossary_hint_max_terms,
                      reasoning_line=cfg.chat_format == "harmony")


def default_spec() -> PromptSpec:
    """The prep defaults (zh -> nan), for a bare base model evaluated without any manifest."""
    from toolkit.config import PrepConfig

    cfg = PrepConfig()
    return PromptSpec(cfg.source_name, cfg.target_name, cfg.instruction, cfg.reasoning_language,
                      cfg.reasoning_effort, cfg.date, cfg.hint_template, cfg.glossary_hint_max_terms)
