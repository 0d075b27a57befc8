"""The Responses API (/v1/responses) with the official openai client on the bundled model: text
and message input, instructions, structured text formats, the streamed event sequence, and the
fields it does not serve refused naming them."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.test_errors import assert_error

EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
ENDS = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=f"{smol.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_text_input_instructions_and_the_same_answer_as_chat(client):
    r = client.responses.create(model="tiny", input="Say hello in French.",
                                instructions="Answer in one short sentence.",
                                max_output_tokens=40, temperature=0)  # fmt: skip
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text
    chat = client.chat.completions.create(
        model="tiny", max_tokens=40, temperature=0,
        messages=[{"role": "system", "content": "Answer in one short sentence."},
                  {"role": "user", "content": "Say hello in French."}],
    )  # fmt: skip
    assert r.output_text == chat.choices[0].message.content
    u = r.usage
    assert u.input_tokens == chat.usage.prompt_tokens
    assert u.output_tokens == chat.usage.completion_tokens
    assert u.total_tokens == u.input_tokens + u.output_tokens
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant"
    assert item.content[0].type == "output_text"


def test_message_input_and_incomplete_at_max_output_tokens(client):
    r = client.responses.create(
        model="tiny", max_output_tokens=4, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}],
    )  # fmt: skip
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4


def test_text_formats_are_structured_outputs(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    r = client.responses.create(model="tiny", input="A person as JSON.", temperature=0,
                                text={"format": {"type": "json_schema", "name": "person",
                                                 "schema": schema, "strict": True}})  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), schema)

    class Person(BaseModel):
        name: str
        age: int

    parsed = client.responses.parse(model="tiny", input="A person as JSON.", text_format=Person,
                                    temperature=0, max_output_tokens=80)  # fmt: skip
    assert isinstance(parsed.output_parsed, Person)


def test_the_stream_is_openais_event_sequence(client):
    kw = dict(model="tiny", input="Count from one to five.", temperature=0, max_output_tokens=60)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == EVENTS and kinds[-4:-1] == ENDS
    assert kinds[-1] == {"completed": "response.completed",
                         "incomplete": "response.incomplete"}[whole.status]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text
    assert events[-1].response.output_text == text


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"background": True}, "background"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0]"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"input": ""}, "input"),
    ],
)  # fmt: skip
def test_what_is_not_served_is_refused_naming_it(smol, extra, param):
    body = {"model": "tiny", "input": "hi", **extra}
    r = httpx.post(f"{smol.url}/v1/responses", json=body, timeout=60)
    err = assert_error(r, 400)
    assert param in err["message"]


def test_responses_are_not_stored(smol, client):
    with pytest.raises(openai.NotFoundError, match="does not store responses"):
        client.responses.retrieve("resp_123")
