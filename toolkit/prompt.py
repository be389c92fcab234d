"""The translation prompt a model was trained with, recovered from a stage manifest.

Training, evaluation and serving must all build the same prompt: this is that one place. The prep
manifest (reachable from every later manifest through its `upstream` chain) records the language
names, instruction template, `reasoning language`, reasoning effort and date, and the chat format the
examples were written for: `harmony` (gpt-oss; the system message starts with `reasoning language: X`) or
`template` (a chat template without a reasoning channel, such as Gemma's: the instruction alone, since
such a model only echoes the line). A prep manifest older than that record wrote the line for every model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from toolkit import harmony
from toolkit.errors import ArtifactError

# Stands in for the user's text while the scaffold of a prompt is rendered (a private-use code point: no
# tokenizer, template or sentence has a reason to hold it).
USER_SLOT = "\ue000user-text\ue000"


@dataclass(frozen=True)
class PromptSpec:
    source_name: str
    target_name: str
    instruction: str  # template with {src} and {tgt}
    reasoning_language: str
    reasoning_effort: str = "low"
    date: str = harmony.DEFAULT_DATE
    # The `reasoning language` line in the system message: True / False as the prep manifest says, None (a
    # bare base model) for Harmony prompts only.
    reasoning_line: bool | None = None

    def reversed(self) -> PromptSpec:
        return replace(self, source_name=self.target_name, target_name=self.source_name)

    def for_direction(self, direction: str) -> PromptSpec:
        """`forward` (source->target as prepared) or `reverse`."""
        return self.reversed() if direction == "reverse" else self

    def messages(self, text: str, target: str | None = None, thinking: str | None = None, *,
                 harmony_format: bool = True) -> list[dict[str, Any]]:
        """The chat messages; `harmony_format`: whether they are rendered as Harmony (decides the reasoning line
        when `reasoning_line` is None)."""
        instruction = self.instruction.format(src=self.source_name, tgt=self.target_name)
        line = harmony_format if self.reasoning_line is None else self.reasoning_line
        return harmony.build_messages(
            text, reasoning_language=self.reasoning_language if line else None, instruction=instruction,
            target=target, thinking=thinking,
        )

    def harmony_prompt(self, text: str) -> str:
        """Harmony text up to `<|start|>assistant`, ready for generation."""
        return harmony.render(
            self.messages(text), reasoning_effort=self.reasoning_effort, date=self.date, add_generation_prompt=True
        )

    def render_prompt(self, text: str, tokenizer: Any = None) -> str:
        """The generation prompt in the model's chat format: Harmony, or the tokenizer's own template."""
        if tokenizer is None or is_harmony_tokenizer(tokenizer):
            return self.harmony_prompt(text)
        return tokenizer.apply_chat_template(
            template_messages(self.messages(text, harmony_format=False)), tokenize=False, add_generation_prompt=True
        )


    def prompt_pieces(self, text: str, tokenizer: Any = None) -> list[tuple[str, bool]]:
        """`render_prompt` split into (piece, is_user_text): the scaffold, whose special tokens are real, and the
        user's text, which a backend must tokenize as plain text (else `<|end|><|start|>system...` in a text
        would forge a turn). The pieces join to exactly `render_prompt(text, tokenizer)`."""
        prompt = self.render_prompt(text, tokenizer)
        slots = self.render_prompt(USER_SLOT, tokenizer).split(USER_SLOT)
        if len(slots) == 2 and prompt.startswith(slots[0]) and prompt.endswith(slots[1]) \
                and len(prompt) >= len(slots[0]) + len(slots[1]):  # the text as the template wrote it (trimmed...)
            head, tail = slots
            pieces = [(head, False), (prompt[len(head):len(prompt) - len(tail)], True), (tail, False)]
        else:  # a template that repeats the text: every slot holds it
            pieces = [(slots[0], False)]
            for part in slots[1:]:
                pieces += [(text, True), (part, False)]
        return [(piece, user) for piece, user in pieces if piece]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a non-Harmony chat template: no `thinking` key (templates differ on it)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def is_harmony_tokenizer(tokenizer: Any) -> bool:
    """True for gpt-oss tokenizers (they carry the Harmony special tokens)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return "<|channel|>" in vocab and "<|message|>" in vocab


def find_prep_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] | None = manifest
    while node is not None:
        if node.get("stage") == "prep":
            return node
        node = node.get("upstream")
    raise ArtifactError("no prep manifest in this folder's upstream chain: it was not made by `toolkit prep`.")


def from_manifest(manifest: dict[str, Any]) -> PromptSpec:
    """The PromptSpec of any stage manifest (prep, train, merge, export)."""
    cfg = find_prep_manifest(manifest)["config"]
    return PromptSpec(
        source_name=cfg["source_name"],
        target_name=cfg["target_name"],
        instruction=cfg["instruction"],
        reasoning_language=cfg["reasoning_language"],
        reasoning_effort=cfg["reasoning_effort"],
        date=cfg["date"],
        # a prep manifest without the record wrote the line for every model: its models were trained with it
        reasoning_line=cfg.get("chat_format", "harmony") == "harmony",
    )


def prep_spec(cfg: Any) -> PromptSpec:
    """The PromptSpec `toolkit prep` writes its examples with (a PrepConfig)."""
    return PromptSpec(cfg.source_name, cfg.target_name, cfg.instruction, cfg.reasoning_language,
                      cfg.reasoning_effort, cfg.date, reasoning_line=cfg.chat_format == "harmony")


def default_spec() -> PromptSpec:
    """The prep defaults (zh -> nan), for a bare base model evaluated without any manifest."""
    from toolkit.config import PrepConfig

    cfg = PrepConfig()
    return PromptSpec(cfg.source_name, cfg.target_name, cfg.instruction, cfg.reasoning_language,
                      cfg.reasoning_effort, cfg.date)


def find_chat_format(manifest: dict[str, Any]) -> str | None:
    """The chat format the train stage recorded in a manifest's upstream chain (None when none did)."""
    node: dict[str, Any] | None = manifest
    while node is not None:
        if node.get("stage") == "train" and node.get("chat_format"):
            return node["chat_format"]
        node = node.get("upstream")
    return None
