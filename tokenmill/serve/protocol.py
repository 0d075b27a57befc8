"""OpenAI-shaped request and response schemas (pydantic), plus the vLLM sampling extensions.

Range checks live in SamplingParams (one set of rules for offline and HTTP use); here the shapes
and types, and that every string a client sends is valid Unicode (JSON can carry a lone
surrogate such as "\ud800", which no UTF-8 encoder, tokenizer or database takes): a 400 that
names the field, never a 500 later. Unknown fields are kept in `model_extra`, so the server can
name them in a warning or refuse them (`--strict-api`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode (a lone surrogate at position {e.start})") from None
    return value


def valid_json_text(value: Any) -> Any:
    """Every string inside a JSON value (keys too) valid Unicode."""
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, dict):
        for k, v in value.items():
            valid_json_text(k)
            valid_json_text(v)
    elif isinstance(value, list):
        for v in value:
            valid_json_text(v)
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
JsonValue = Annotated[Any, AfterValidator(valid_json_text)]


class RequestModel(BaseModel):
    """A client's request: unknown fields kept (and checked) for the server to name."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _extras_are_valid_text(self):
        valid_json_text(self.model_extra or {})
        return self


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk too (needs include_usage)


def _active(value: Any) -> bool:
    return value not in (None, False, "", [], {}, "none", "auto")


# Fields OpenAI's or vLLM's clients send whose effect this server does not have yet: refused
# with a 400 naming them, never answered as if they had been honoured. Each: is it in use?
NOT_YET = {
    "functions": _active,  # the deprecated form of tools: send `tools`
    "function_call": lambda v: v not in (None, "none", "auto"),
    "guided_whitespace_pattern": _active,
    "suffix": _active,
}


# ---- structured outputs -----------------------------------------------------------------------
class JsonSchemaFormat(RequestModel):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[Text, JsonValue] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ResponseFormat(RequestModel):
    """OpenAI's response_format: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(RequestModel):
    """vLLM's `structured_outputs` extra field (its StructuredOutputsParams)."""

    json_: dict[Text, JsonValue] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[NonEmptyText] | None = Field(default=None, min_length=1)
    grammar: Text | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None  # false: JSON whitespace allowed anywhere

    model_config = ConfigDict(extra="allow", populate_by_name=True)


CONSTRAINT_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")  # fmt: skip
_AT_MOST_ONE = {  # documents what constraints.requested checks: one output constraint at most
    "allOf": [
        {"not": {"required": [a, b]}}
        for i, a in enumerate(CONSTRAINT_FIELDS)
        for b in CONSTRAINT_FIELDS[i + 1 :]
    ]
}
NonEmptyText = Annotated[str, AfterValidator(valid_unicode), Field(min_length=1)]
# a prompt (or embedding input): text, texts, token ids or lists of them; nothing empty
PromptInput = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
)


class SamplingFields(RequestModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_AT_MOST_ONE)

    model: Text | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=128)
    best_of: int | None = None  # accepted only equal to n: there is no best-of-n search
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[Text, float] | None = None  # OpenAI's: token id (as a string) -> bias
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: dict[Text, JsonValue] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[NonEmptyText] | None = Field(default=None, min_length=1)
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = None  # accepted; the grammar engine is llguidance
    prompt_logprobs: int | None = None  # vLLM's: every prompt token's logprob, rank, top k

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        if bias is None:
            return None
        try:
            return {int(k): v for k, v in bias.items()}
        except ValueError:
            raise ValueError("keys must be token ids (integers as strings)") from None

    @model_validator(mode="after")
    def _nothing_silently_dropped(self):
        extra = self.model_extra or {}
        for name, in_use in NOT_YET.items():
            if name in extra and in_use(extra[name]):
                raise ValueError(
                    f"{name} is not supported by this server yet; remove it (answering without "
                    "it would silently ignore what it asks for)"
                )
        return self

    @property
    def continuous_usage(self) -> bool:
        o = self.stream_options
        return o is not None and o.include_usage and o.continuous_usage_stats

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                f"best_of ({self.best_of}) is not supported unless it equals n ({self.n}); "
                "request n completions and choose among them"
            )
        return self


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    logprobs: int | None = Field(default=None, description="top logprobs per token, 0-20")
    echo: bool = False
    max_tokens: int | None = 16

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(p == [] for p in prompt)):
            raise ValueError("must not be empty (nor hold an empty prompt)")
        return prompt


class ContentPart(RequestModel):
    type: Text
    text: Text | None = None  # for type "text"; other types are refused when rendering


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[dict[Text, JsonValue]] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers


class FunctionDefinition(RequestModel):
    name: Annotated[str, AfterValidator(valid_unicode)] = Field(min_length=1, max_length=256)
    description: Text | None = None
    parameters: dict[Text, JsonValue] | None = None
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[Text, JsonValue] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one token at one prompt position."""

    logprob: float
    rank: int | None = None  # 1: the most likely token there
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt token; the first is null


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments


class ToolCall(BaseModel):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with prompt_logprobs


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# ---- vLLM's /tokenize and /detokenize --------------------------------------------------------
class TokenizeRequest(RequestModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered by the model's template."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={  # exactly one of the two, as the validator below checks
            "oneOf": [
                {"required": ["prompt"], "not": {"required": ["messages"]},
                 "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "not": {"required": ["prompt"]},
                 "properties": {"messages": {"type": "array"}}},
            ]
        },
    )  # fmt: skip
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True  # chat
    add_special_tokens: bool | None = None  # default: true for a prompt, false for chat
    chat_template_kwargs: dict[Text, JsonValue] | None = None  # chat
    tools: list[Tool] | None = None  # chat: rendered as a chat request's tools would be
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt or messages: send exactly one")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- embeddings ------------------------------------------------------------------------------
class EmbeddingRequest(RequestModel):
    model: Text | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # only the model's own: its vectors are not shortened
    user: Text | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if value == "" or (
            isinstance(value, list) and (not value or any(v in ("", []) for v in value))
        ):
            raise ValueError("must not be empty (nor hold an empty input)")
        return value


class EmbeddingData(BaseModel):
    object: str = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---- the Responses API -----------------------------------------------------------------------
class InputPart(RequestModel):
    type: Text  # input_text / output_text; others are refused when the prompt is rendered
    text: Text | None = None


class InputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: NonEmptyText | list[InputPart]


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Text | None = None
    description: Text | None = None
    schema_: dict[Text, JsonValue] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextConfig(RequestModel):
    format: TextFormat | None = None


# Responses API fields this server does not serve: refused naming them (nothing is stored, so
# there is no earlier response to continue; function tools are served by chat completions)
RESPONSES_REFUSED = {
    "previous_response_id": _active,
    "conversation": _active,
    "background": _active,
    "tools": _active,
    "reasoning": _active,
    "prompt": _active,
    "include": _active,
}


class ResponsesRequest(RequestModel):
    model: Text | None = None
    input: NonEmptyText | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension, as on chat
    seed: int | None = None  # likewise
    stream: bool = False
    text: TextConfig | None = None
    store: bool | None = None  # accepted; responses are never stored (GET .../{id} is a 404)
    metadata: dict[Text, Text] | None = None
    user: Text | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None

    @model_validator(mode="after")
    def _refused(self):
        extra = self.model_extra or {}
        for name, in_use in RESPONSES_REFUSED.items():
            if name in extra and in_use(extra[name]):
                raise ValueError(
                    f"{name} is not supported by this server's Responses API (responses are not "
                    "stored; function tools are served on /v1/chat/completions); remove it"
                )
        return self


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: str = "response"
    created_at: int
    model: str
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any]
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    tools: list[Any] = Field(default_factory=list)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    store: bool = False
    truncation: str = "disabled"
    previous_response_id: str | None = None
