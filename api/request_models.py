"""The JSON submit bodies as pydantic models: the types of the fields Ferry and the contract know.

One model per JSON request type, the single source of what a submit body may hold (an OpenAPI
document can be generated from them: ``ChatCompletionRequest.model_json_schema()``). Bifrost
decodes a body into typed structs, so a known field of the wrong JSON type is refused there
(``"messages": "hi"``); these models refuse the same. They are strict (JSON types only: no
``"true"`` for a boolean, no number for a string) and allow extra fields, which are forwarded to
the provider untouched; only fields whose OpenAI shape is certain are typed. A known field may be
absent or null: whether it is required is the contract's per-type check (``JSON_RULES`` in
``api.validation``), with its own messages.
"""

from __future__ import annotations

from typing import Annotated, Any, NotRequired, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from app.jobs import RequestType


def one_of(expected: str) -> WrapValidator:
    """A union's mismatch as one message (``expected a string or an array of strings``), rather
    than one error per member of the union; the schema stays the union's."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("wrong_type", "expected {expected}", {"expected": expected}) from None

    return WrapValidator(validate)


# An array checked up to its first wrong item: a union of array types otherwise collects one
# error per item for each member it tries, which makes a long wrong array slow to refuse.
_Item = TypeVar("_Item")
Array = Annotated[list[_Item], Field(fail_fast=True)]


# -- shared shapes ------------------------------------------------------------------------------

def _whole_number(value: Any) -> Any:
    # Only where a float holds every integer exactly: a larger one may be a rounded integer
    # outside the range the JSON parser reads as integers, which stays refused.
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2 ** 53:
        return int(value)
    return value


# A token id: an integer. JSON does not tell 1 from 1.0 (RFC 8259 has one number type, and
# JSON Schema calls 1.0 an integer), so a whole number written with a fraction is one too.
TokenId = Annotated[int, BeforeValidator(_whole_number)]

# OpenAI's text and embedding inputs: a string, strings, a token array, or token arrays.
TextOrTokens = Annotated[
    str | Array[str] | Array[TokenId] | Array[Array[TokenId]],
    one_of("a string, an array of strings, an array of token ids or an array of token id arrays"),
]

# Message parts and messages are TypedDicts, not models: validating one costs less than building
# a model instance, and a body can hold a hundred thousand of them.


@with_config(ConfigDict(extra="allow", strict=True))
class ContentPart(TypedDict):
    """One part of a message's content array (``text``, ``image_url``, ``input_audio``, ``file``...)."""

    type: str


MessageContent = Annotated[
    str | Array[ContentPart], one_of("a string, an array of content parts (objects with a type) or null"),
]


@with_config(ConfigDict(extra="allow", strict=True))
class ChatMessage(TypedDict):
    """A chat message; ``tool_calls``, ``tool_call_id``, ``name`` and the like pass through."""

    role: str
    content: NotRequired[MessageContent | None]  # null or absent: an assistant's tool calls, for one


# -- the request bodies ------------------------------------------------------------------------------


class RequestBody(BaseModel):
    """What every JSON submit may carry for Ferry itself: the target and its fallbacks."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, description="provider/model, split on the first slash.")
    fallbacks: Array[str] | None = Field(
        None, description="provider/model names tried in order when the primary fails.")


class TextCompletionRequest(RequestBody):
    prompt: TextOrTokens | None = None
    stream: bool | None = None


class ChatCompletionRequest(RequestBody):
    messages: Array[ChatMessage] | None = None
    stream: bool | None = None


class ResponsesRequest(RequestBody):
    # The Responses API's input items (messages, item references, tool outputs) are all objects.
    input: Annotated[str | Array[dict[str, Any]], one_of("a string or an array of input items (objects)")] | None = None
    stream: bool | None = None


class EmbeddingRequest(RequestBody):
    input: TextOrTokens | None = None


class SpeechRequest(RequestBody):
    input: str | None = None
    # A built-in voice's name, or an object naming a custom voice ({"id": "voice_..."}).
    voice: Annotated[str | dict[str, Any], one_of("a string or an object")] | None = None
    stream_format: str | None = None


class ImageGenerationRequest(RequestBody):
    prompt: str | None = None
    stream: bool | None = None


class RerankRequest(RequestBody):
    query: str | None = None
    documents: Array[Annotated[str | dict[str, Any], one_of("a string or an object")]] | None = None


class OcrRequest(RequestBody):
    document: dict[str, Any] | None = Field(None, description="Mistral's OCR document: document_url or image_url.")


REQUEST_MODELS: dict[RequestType, type[RequestBody]] = {
    RequestType.text_completion: TextCompletionRequest,
    RequestType.chat_completion: ChatCompletionRequest,
    RequestType.responses: ResponsesRequest,
    RequestType.embedding: EmbeddingRequest,
    RequestType.speech: SpeechRequest,
    RequestType.image_generation: ImageGenerationRequest,
    RequestType.rerank: RerankRequest,
    RequestType.ocr: OcrRequest,
}
