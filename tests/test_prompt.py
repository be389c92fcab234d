"""PromptSpec and the manifest chain: every stage rebuilds the prompt and chat format it was trained with."""

from __future__ import annotations

import pytest

from toolkit import prompt, runs
from toolkit.config import PrepConfig
from toolkit.errors import ArtifactError


def chain(chat_format: str | None = "harmony") -> dict:
    prep = {"stage": "prep", "config": {**PrepConfig(reasoning_language="Deutsch").__dict__}, "upstream": None}
    train = {"stage": "train", "chat_format": chat_format, "upstream": prep}
    merge = {"stage": "merge", "upstream": train}
    return {"stage": "export", "upstream": merge}


def test_spec_and_chat_format_come_from_the_upstream_chain():
    spec = prompt.from_manifest(chain())
    assert spec.reasoning_language == "Deutsch"
    assert spec.harmony_prompt("一朵花").endswith("<|start|>user<|message|>一朵花<|end|><|start|>assistant")
    assert "from Taiwanese Hokkien (Han characters) into Mandarin" in spec.reversed().messages("x")[0]["content"]
    assert runs.chat_format(chain("template")) == "template"
    assert runs.chat_format(chain()) == "harmony"
    assert runs.chat_format({"stage": "merge", "upstream": None}) is None


def test_a_folder_without_prep_upstream_is_an_error():
    with pytest.raises(ArtifactError, match="not made by `toolkit prep`"):
        prompt.from_manifest({"stage": "merge", "upstream": None})
