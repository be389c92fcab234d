"""Harmony renderer and parser, checked byte for byte against openai-harmony (rendering offline)."""

from __future__ import annotations

import jinja2
import pytest

from toolkit import harmony
from toolkit.prompt import PromptSpec

oh = pytest.importorskip("openai_harmony", reason="openai-harmony is part of the [tokens] extra")

EFFORT = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
CASES = [
    ("一朵花", "一蕊花", None, "low"),
    ("他們兩個長得一模一樣。", "𪜶兩个生做一模一樣。", "The user wants Taigi. 他們 -> 𪜶.", "medium"),
    ("Line one\nline two\t tab  ", "  spaced\n\nanswer ", "multi\nline reasoning", "high"),
]


def reference(system: str, user: str, final: str | None, thinking: str | None, effort: str, date: str):
    """openai-harmony's own rendering of the same conversation (tokens decoded to text)."""
    enc = harmony_encoding()
    msgs = [
        oh.Message.from_role_and_content(
            oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(EFFORT[effort]).with_conversation_start_date(date)
        ),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(system)),
        oh.Message.from_role_and_content(oh.Role.USER, user),
    ]
    if final is None:
        tokens = enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), oh.Role.ASSISTANT)
        return enc.decode(tokens)
    if thinking:
        msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, thinking).with_channel("analysis"))
    msgs.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, final).with_channel("final"))
    cfg = oh.RenderConversationConfig(auto_drop_analysis=False)
    return enc.decode(enc.render_conversation_for_training(oh.Conversation.from_messages(msgs), cfg))


def harmony_encoding():
    from toolkit.tokenizer import harmony_encoding as load

    return load()


@pytest.mark.parametrize("source,target,thinking,effort", CASES)
def test_training_example_matches_openai_harmony(source, target, thinking, effort):
    spec = PromptSpec("Mandarin", "Taigi", "Translate {src} to {tgt}.", "English", effort, "2025-06-28")
    messages = spec.messages(source, target=target, thinking=thinking)
    ours = harmony.render(messages, reasoning_effort=effort, date="2025-06-28")
    assert ours == reference(messages[0]["content"], source, target, thinking, effort, "2025-06-28")
    assert ours.endswith("<|return|>")
    assert "reasoning language: English\n\nTranslate Mandarin to Taigi." in ours


@pytest.mark.parametrize("source,target,thinking,effort", CASES)
def test_generation_prompt_matches_openai_harmony(source, target, thinking, effort):
    spec = PromptSpec("Mandarin", "Taigi", "Translate {src} to {tgt}.", "Deutsch", effort, "2026-01-02")
    prompt = spec.harmony_prompt(source)
    assert prompt == reference(spec.messages(source)[0]["content"], source, None, None, effort, "2026-01-02")
    assert prompt.endswith("<|start|>assistant")


def test_split_example_supervises_only_the_answer():
    messages = harmony.build_messages("一朵花", reasoning_language="English", instruction="T.", target="一蕊花",
                                      thinking="hm")
    prompt, completion = harmony.split_example(messages, reasoning_effort="low")
    assert prompt + completion == harmony.render(messages, reasoning_effort="low")
    assert prompt.endswith("<|start|>user<|message|>一朵花<|end|><|start|>assistant")
    assert completion == "<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>一蕊花<|return|>"


def test_chat_template_equals_renderer():
    template = jinja2.Environment().from_string(harmony.CHAT_TEMPLATE)
    for source, target, thinking, effort in CASES:
        messages = harmony.build_messages(source, reasoning_language="English", instruction="T.", target=target,
                                          thinking=thinking)
        for gen in (False, True):
            msgs = messages[:-1] if gen else messages
            expected = harmony.render(msgs, reasoning_effort=effort, add_generation_prompt=gen)
            assert template.render(messages=msgs, reasoning_effort=effort, add_generation_prompt=gen) == expected


def test_earlier_assistant_turns_end_with_end_token():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "thinking": "dropped"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    text = harmony.render(msgs)
    assert "<|channel|>final<|message|>b<|end|>" in text and "dropped" not in text
    assert text.endswith("<|channel|>final<|message|>d<|return|>")
    assert "<|start|>developer" not in text


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="role 'tool'"):
        harmony.render([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "output,final,analysis,complete",
    [
        ("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>一蕊花<|return|>",
         "一蕊花", "think", True),
        ("<|channel|>final<|message|>一蕊花<|return|>", "一蕊花", None, True),
        ("<|channel|>final<|message|>一蕊花<|end|>", "一蕊花", None, True),
        ("一蕊花", "一蕊花", None, False),  # no channel header at all
        ("<|channel|>final<|message|>一蕊", "一蕊", None, False),  # cut off by the length limit
        ("<|channel|>analysis<|message|>thinking and then the limit", None, "thinking and then the limit", False),
        ("<|channel|>analysis<|message|>a<|end|>", None, "a", False),  # missing final channel
        ("<|start|>assistant<|channel|>final<|message|>一<|endoftext|>蕊花<|return|><|return|>", "一蕊花", None, True),
        ("<|channel|>final <|constrain|>text<|message|>ok<|return|>", "ok", None, True),
        ("", None, None, False),
        ("<|channel|>commentary to=functions.x<|message|>{}<|call|>", None, None, False),
    ],
)
def test_parse(output, final, analysis, complete):
    parsed = harmony.parse(output)
    assert (parsed.final, parsed.analysis, parsed.complete) == (final, analysis, complete)
    assert parsed.text == (final or "")


def test_parse_roundtrips_rendered_completion():
    messages = harmony.build_messages("x", reasoning_language="English", instruction="T.", target="答案",
                                      thinking="推理")
    _, completion = harmony.split_example(messages)
    assert harmony.parse(completion) == harmony.Parsed(final="答案", analysis="推理", complete=True)


def test_bad_effort():
    with pytest.raises(ValueError, match="reasoning effort"):
        harmony.system_text("extreme")
