"""Harmony, the chat format of gpt-oss: render conversations to its exact text and parse model output.

`render` follows the official gpt-oss chat template (openai/gpt-oss-20b `chat_template.jinja`) for
conversations without tools: a system block with the model identity, knowledge cutoff, date, reasoning
effort and valid channels; the first system/developer message as developer `# Instructions`; then user
and assistant messages. A training example's last assistant message carries its `thinking` as the
analysis channel and ends with `<|return|>`; earlier messages end with `<|end|>`. Tests compare this
byte for byte with the `openai-harmony` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
DEFAULT_DATE = "2025-06-28"
EFFORTS = ("low", "medium", "high")
SPECIAL_TOKENS = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>",
    "<|startoftext|>", "<|endoftext|>", "<|endofprompt|>",
)
STOP_TOKENS = ("<|return|>", "<|call|>")
_SPECIAL_RE = re.compile(r"<\|[a-z_0-9]+\|>")

# A Jinja chat template equal to `render` (attached to tokenizers we build, so `apply_chat_template`
# and llama.cpp see the same text). It is a subset of the official one: no tools, no builtin tools.
CHAT_TEMPLATE = (
    "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{%- if date is not defined %}{%- set date = '" + DEFAULT_DATE + "' %}{%- endif %}"
    "{{- '<|start|>system<|message|>" + MODEL_IDENTITY + "\\nKnowledge cutoff: " + KNOWLEDGE_CUTOFF + "\\n'"
    " + 'Current date: ' + date + '\\n\\nReasoning: ' + reasoning_effort + '\\n\\n'"
    " + '# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' }}"
    "{%- if messages[0].role in ['system', 'developer'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- if messages[0].content %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + messages[0].content + '<|end|>' }}"
    "{%- endif %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if loop.last and not add_generation_prompt %}"
    "{%- if message.thinking is defined and message.thinking %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}"
    "{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}"
    "{%- else %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)


def defuse_specials(text: str) -> str:
    """`text` with a zero-width space after every `<` of `<|`, so that a server which tokenizes a whole prompt
    with special tokens parsed (Ollama has no other way) reads `<|end|>` in a user's text as text, not as a
    control token. Only texts holding `<|` change."""
    return text.replace("<|", "<\u200b|")


def system_text(reasoning_effort: str = "medium", date: str = DEFAULT_DATE) -> str:
    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning effort must be one of {EFFORTS}, not {reasoning_effort!r}")
    return (
        f"{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {date}\n\n"
        f"Reasoning: {reasoning_effort}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )


def system_option(reasoning_language: str | None, instruction: str = "") -> str:
    """The first (system) message of an example, as the multilingual-reasoner recipe writes it; without a
    reasoning language (a chat format with no reasoning channel) the instruction alone."""
    if not reasoning_language:
        return instruction
    text = f"reasoning language: {reasoning_language}"
    return f"{text}\n\n{instruction}" if instruction else text


def build_messages(
    source: str,
    *,
    reasoning_language: str | None,
    instruction: str,
    target: str | None = None,
    thinking: str | None = None,
) -> list[dict[str, Any]]:
    """The chat messages of one translation example (target None: a prompt for generation; reasoning_language
    None: no `reasoning language` line, for a model without a reasoning channel)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_option(reasoning_language, instruction)},
        {"role": "user", "content": source},
    ]
    if target is not None:
        answer: dict[str, Any] = {"role": "assistant", "content": target}
        if thinking:
            answer["thinking"] = thinking
        messages.append(answer)
    return messages


def render(
    messages: list[dict[str, Any]],
    *,
    reasoning_effort: str = "medium",
    date: str = DEFAULT_DATE,
    add_generation_prompt: bool = False,
) -> str:
    """Harmony text of `messages`, as the gpt-oss chat template renders it (tools aside)."""
    parts = [f"<|start|>system<|message|>{system_text(reasoning_effort, date)}<|end|>"]
    rest = messages
    if messages and messages[0]["role"] in ("system", "developer"):
        rest = messages[1:]
        if messages[0]["content"]:
            parts.append(f"<|start|>developer<|message|># Instructions\n\n{messages[0]['content']}<|end|>")
    for i, msg in enumerate(rest):
        role = msg["role"]
        if role == "user":
            parts.append(f"<|start|>user<|message|>{msg['content']}<|end|>")
        elif role == "assistant":
            if i == len(rest) - 1 and not add_generation_prompt:
                if msg.get("thinking"):
                    parts.append(f"<|start|>assistant<|channel|>analysis<|message|>{msg['thinking']}<|end|>")
                parts.append(f"<|start|>assistant<|channel|>final<|message|>{msg['content']}<|return|>")
            else:
                parts.append(f"<|start|>assistant<|channel|>final<|message|>{msg['content']}<|end|>")
        else:
            raise ValueError(f"message {i + 1}: role {role!r} is not supported here (system/developer first, "
                             "then user and assistant)")
    if add_generation_prompt:
        parts.append("<|start|>assistant")
    return "".join(parts)


def split_example(messages: list[dict[str, Any]], **kw: Any) -> tuple[str, str]:
    """(prompt, completion) of a training example whose last message is the assistant's answer.

    prompt + completion == render(messages): the prompt ends with `<|start|>assistant`, the completion
    (the only supervised part) holds the channels, the answer and `<|return|>`.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training example must end with an assistant message")
    full = render(messages, **kw)
    prompt = render(messages[:-1], add_generation_prompt=True, **kw)
    assert full.startswith(prompt)
    return prompt, full[len(prompt):]


@dataclass(frozen=True)
class Parsed:
    """Model output split into channels. `final` is None when no final text was produced."""

    final: str | None
    analysis: str | None
    complete: bool  # the final message ended with <|return|>, <|end|> or <|call|>

    @property
    def text(self) -> str:
        return self.final or ""


def _clean(text: str) -> str:
    return _SPECIAL_RE.sub("", text).strip()


def parse(output: str) -> Parsed:
    """Split generated text (what follows the prompt's `<|start|>assistant`) into analysis and final.

    Tolerates: a missing channel header (the whole text is the final answer), a message cut off by the
    length limit (complete=False), a repeated `<|start|>assistant` or role header, and stray special
    tokens inside messages (dropped).
    """
    analysis: list[str] = []
    final: str | None = None
    complete = False
    # Each segment is one message; the first may lack the leading <|start|>assistant.
    for segment in re.split(r"<\|start\|>", output):
        if not segment.strip():
            continue
        header, sep, body = segment.partition("<|message|>")
        if not sep:
            # No header at all: plain text. Count it as final unless it is only a role/channel stub.
            if "<|channel|>" in segment or segment.strip() in ("assistant",):
                continue
            header, body = "", segment
        end = re.search(r"<\|(end|return|call)\|>", body)
        content = body[: end.start()] if end else body
        channel_match = re.search(r"<\|channel\|>\s*([a-z]+)", header)
        channel = channel_match.group(1) if channel_match else "final"
        if channel == "analysis":
            analysis.append(_clean(content))
        elif channel == "final":
            final = _clean(content)
            complete = end is not None
        # commentary (tool calls) is ignored: translation uses no tools
    return Parsed(final=final, analysis="\n".join(analysis) if analysis else None, complete=complete)
