"""The streamed text-delta fast path renders exactly what the pydantic models would."""

from __future__ import annotations

import json

import pytest

from tokenmill.serve import protocol as P
from tokenmill.serve.handlers import DeltaEvents, sse

DELTAS = [
    "",
    " Paris",
    'quote " and backslash \\ and slash /',
    "line\nbreak\ttab\r\x08\x0c",
    "\x00\x01\x1f\x7f control",
    "naïve — café 東京 🙂",
    "\u2028\u2029 separators",
    DeltaEvents.MARK[:3],
    "}]},{",
]


def completion(model: str):
    return lambda index, text: P.CompletionResponse(
        id="cmpl-1", model=model, created=7, choices=[P.CompletionChoice(index=index, text=text)]
    )


def chat(model: str):
    return lambda index, text: P.ChatCompletionChunk(
        id="chatcmpl-1",
        model=model,
        created=7,
        choices=[P.ChatChunkChoice(index=index, delta=P.DeltaMessage(content=text))],
    )


@pytest.mark.parametrize("make", [completion, chat])
@pytest.mark.parametrize("model", ["smollm2", 'odd "model" ☃', f"has-{DeltaEvents.MARK}-mark"])
def test_delta_event_equals_model_rendering(make, model):
    events = DeltaEvents(make(model))
    for index in (0, 2, 11):  # each choice its own template
        assert events.templated(index) == (DeltaEvents.MARK not in model)
        for delta in DELTAS:
            fast, slow = events.event(index, delta), sse(make(model)(index, delta))
            assert fast.startswith("data: ") and fast.endswith("\n\n")
            assert json.loads(fast[6:]) == json.loads(slow[6:])
            if delta.isprintable():
                assert fast == slow  # byte for byte where no escaping choice exists
