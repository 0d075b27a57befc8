"""Structured outputs and tool calling through the HTTP API, with the clients users run: the
official openai client and langchain-openai, against the bundled SmolLM2-135M-Instruct (a real
model: it writes real JSON and stops) and the tool template tokenmill ships for it."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_errors import assert_error

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"enum": ["France", "Italy", "Spain", "Japan"]},
            "sights": {"type": "array", "items": {"type": "string", "maxLength": 24},
                       "minItems": 1, "maxItems": 3},
        },
        "required": ["city", "country", "sights"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "answer": {"type": "boolean"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "reason": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        },
        "required": ["answer", "confidence", "reason"],
        "additionalProperties": False,
    },
]  # fmt: skip
PROMPTS = ["Describe a person as JSON.", "Tell me about a city you like, as JSON.",
           "Is water wet? Answer as JSON."]  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=f"{smol.url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", [{"role": "user", "content": PROMPTS[0]}])
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(**kw)


def test_json_schema_outputs_validate_over_schemas_and_seeds(client):
    jobs = [(s, p, seed) for s, p in zip(SCHEMAS, PROMPTS) for seed in range(4)]

    def run(job):
        schema, prompt, seed = job
        r = chat(client, messages=[{"role": "user", "content": prompt}], seed=seed,
                 temperature=0.9, response_format={"type": "json_schema", "json_schema": {
                     "name": "answer", "schema": schema, "strict": True}})  # fmt: skip
        return schema, r.choices[0]

    with ThreadPoolExecutor(8) as pool:  # one batch in the engine: masks of many rows
        results = list(pool.map(run, jobs))
    texts = set()
    for schema, choice in results:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
        texts.add(choice.message.content)
    assert len(texts) > len(jobs) // 2


REGEXES = [
    r"[A-Z][a-z]{2,9}, [A-Z][a-z]{2,9}",
    r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"[a-z]{3,8}@[a-z]{3,8}\.(com|org|net)",
    r"(yes|no|maybe)!?",
    r"#[0-9a-f]{6}",
]


def test_regex_outputs_match_over_patterns_and_seeds(client):
    jobs = [(rx, seed) for rx in REGEXES for seed in range(3)]

    def run(job):
        rx, seed = job
        r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=40, seed=seed,
                                      temperature=0.9, extra_body={"guided_regex": rx})  # fmt: skip
        return rx, r.choices[0]

    with ThreadPoolExecutor(5) as pool:
        for rx, choice in pool.map(run, jobs):
            assert choice.finish_reason == "stop" and re.fullmatch(rx, choice.text), (rx, choice)


def test_json_object_regex_choice_and_grammar(client):
    r = chat(client, response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=20,
                                  temperature=0, extra_body={"guided_regex": r" [A-Z][a-z]+\."})  # fmt: skip
    assert re.fullmatch(r" [A-Z][a-z]+\.", r.choices[0].text)
    for choices in (["yes", "no"], ["positive", "negative", "neutral"]):
        r = chat(client, messages=[{"role": "user", "content": "Is the sky blue?"}],
                 extra_body={"guided_choice": choices}, temperature=1.0, seed=5)  # fmt: skip
        assert r.choices[0].message.content in choices
    gbnf = 'root ::= "(" [0-9] [0-9]? ", " [0-9] [0-9]? ")"'
    r = client.completions.create(model="tiny", prompt="A point:", max_tokens=20,
                                  extra_body={"structured_outputs": {"grammar": gbnf}})  # fmt: skip
    assert re.fullmatch(r"\([0-9]{1,2}, [0-9]{1,2}\)", r.choices[0].text)


def test_streams_equal_whole_answers_and_n_choices_each_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    whole = chat(client, response_format=fmt, temperature=0).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in chat(client, response_format=fmt, temperature=0, stream=True)
        if c.choices
    ]
    assert "".join(parts) == whole and len(parts) > 3
    r = chat(client, response_format=fmt, n=3, temperature=1.0, seed=11)
    assert len(r.choices) == 3
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)


def reassemble(stream):
    calls, content, finish = {}, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                call["id"], call["name"] = tc.id, tc.function.name
            call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_calls_tools_with_valid_arguments(client, parallel):
    kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
              parallel_tool_calls=parallel, max_tokens=400)  # fmt: skip
    msg = chat(client, **kw).choices[0].message
    assert msg.tool_calls and (parallel or len(msg.tool_calls) == 1)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    content, calls, finish = reassemble(chat(client, **kw, stream=True))
    assert finish == "tool_calls" and not content
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in msg.tool_calls
    ]


def test_a_named_tool_choice_forces_that_function(client):
    kw = dict(messages=ASK, tools=[WEATHER, TIME], temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_time"}})  # fmt: skip
    r = chat(client, **kw)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TIME["function"]["parameters"])
    assert set(args) == {"zone"}  # closed: no invented parameters
    _, calls, _ = reassemble(chat(client, **kw, stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", call.function.arguments)]


def test_auto_tool_choice_answers_and_a_tool_result_renders(client):
    r = chat(client, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60)
    msg = r.choices[0].message
    assert msg.content or msg.tool_calls
    follow = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type":
         "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"},
    ]  # fmt: skip
    r = chat(client, messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=30)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "body, param, match",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
          "type": "object", "not": {}}}}}, "response_format.json_schema.schema", "not"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format", "needs json_schema.schema"),
        ({"guided_regex": "[a-"}, "guided_regex", "invalid regex"),
        ({"guided_json": {"type": "integer"}, "guided_regex": "a"}, "guided_regex",
         "only one output constraint"),
        ({"structured_outputs": {"grammar": "root ::= ::"}}, "structured_outputs", "grammar"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "no tool named 'nope'"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
          "type": "object", "uniqueItems": True}}}], "tool_choice": "required"},
         "tools[0].function.parameters", "uniqueItems"),
        ({"functions": [{"name": "f"}]}, None, "functions"),
    ],
)  # fmt: skip
def test_bad_constraints_and_tool_choices_are_400s_naming_the_field(smol, body, param, match):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    r = httpx.post(f"{smol.url}/v1/chat/completions", json={**base, **body}, timeout=60)
    err = assert_error(r, 400, param)
    assert match in err["message"]


def test_auto_tool_choice_needs_the_servers_flags(server):
    """The tiny server runs without --enable-auto-tool-choice: tools with "auto" are a clear
    400, while required and named choices need no parser."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}}}  # fmt: skip
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
            "tools": [tool]}  # fmt: skip
    headers = {"Authorization": "Bearer test-key"}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=base, headers=headers, timeout=60)
    assert "--enable-auto-tool-choice" in assert_error(r, 400, "tool_choice")["message"]
    named = {**base, "tool_choice": {"type": "function", "function": {"name": "f"}}}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=named, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "f" and json.loads(call["function"]["arguments"])["a"] in (
        1,
        2,
    )


# ---- langchain-openai -----------------------------------------------------------------------
class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=24, description="the city's name")
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=50)  # a float's digits are unbounded


def get_weather(city: str, unit: str) -> str:
    """The current weather in a city.

    Args:
        city: the city's name
        unit: celsius or fahrenheit
    """
    return f"21 {unit} in {city}"


@pytest.fixture(scope="module")
def lc_chat(smol):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{smol.url}/v1", api_key="none", model="tiny", temperature=0,
                      max_tokens=250, max_retries=0)  # fmt: skip


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_pydantic_object(lc_chat, method):
    runnable = lc_chat.with_structured_output(City, method=method)
    city = runnable.invoke("Name a large city in Europe.")
    assert isinstance(city, City) and city.name


def test_langchain_bind_tools_returns_tool_calls(lc_chat):
    bound = lc_chat.bind_tools([get_weather], tool_choice="get_weather")
    msg = bound.invoke("What's the weather in Rome?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    bound = lc_chat.bind_tools([get_weather], tool_choice="any")  # langchain's "required"
    assert bound.invoke("What's the weather in Oslo?").tool_calls


def test_tokenize_renders_tools_as_a_chat_request_does(smol, client):
    r = chat(client, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1)
    body = {"model": "tiny", "messages": ASK, "tools": [WEATHER]}
    tokens = httpx.post(f"{smol.url}/tokenize", json=body, timeout=60).json()
    assert tokens["count"] == r.usage.prompt_tokens
    plain = httpx.post(f"{smol.url}/tokenize", json={"model": "tiny", "messages": ASK}).json()
    assert plain["count"] < tokens["count"]  # the tool section is in the prompt
