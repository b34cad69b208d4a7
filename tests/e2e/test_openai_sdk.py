"""The official OpenAI SDK through nimgate to a real llama.cpp server (and to nim-sim for the
Responses API, which llama.cpp does not serve). The model is random, so these tests assert
structure, usage and finish reasons, never the text."""

import openai
import pytest

from conftest import ALIAS, KEY_ALIAS_ONLY, KEY_METERED, KEY_ONE_PER_MINUTE, MODEL, SIM_MODEL, sdk

HELLO = [{"role": "user", "content": "Say hello."}]


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert len(raw.headers["x-request-id"]) == 32
    reply = raw.parse()
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream(client):
    # Greedy sampling: both requests below generate the same tokens.
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True, temperature=0))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content, "some tokens arrived"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(chunk.usage is None for chunk in chunks), "no usage chunk unless asked for"


def test_chat_stream_with_usage(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert 0 < last.usage.completion_tokens <= 8
    assert last.usage.prompt_tokens > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("length", "stop")


def test_completion(client):
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert isinstance(reply.choices[0].text, str)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert 0 < reply.usage.completion_tokens <= 8


def test_models_lists_the_routed_models(client):
    ids = [model.id for model in client.models.list()]
    assert ids == [SIM_MODEL, MODEL, ALIAS]


def test_alias_is_served_by_the_upstream_model(gateway):
    reply = sdk(gateway, KEY_ALIAS_ONLY).chat.completions.create(model=ALIAS, messages=HELLO, max_tokens=4)
    assert reply.model == MODEL
    assert reply.usage.completion_tokens > 0


def test_unrouted_model_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no/such-model", messages=HELLO)
    assert error.value.code == "model_not_found"
    assert error.value.type == "invalid_request_error"


def test_unknown_key_is_an_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as error:
        sdk(gateway, "sk-wrong").chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.code == "invalid_api_key"


def test_model_outside_the_acl_is_a_permission_error(gateway):
    with pytest.raises(openai.PermissionDeniedError) as error:
        sdk(gateway, KEY_ALIAS_ONLY).chat.completions.create(model=MODEL, messages=HELLO)
    assert error.value.code == "model_not_allowed"


def test_the_backends_own_error_passes_through(client):
    # llama.cpp refuses json_object response formats with its own 400: nimgate forwards it as is.
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                       response_format={"type": "json_object"})
    assert error.value.code != "invalid_request", "the backend's error, not one of nimgate's"


def test_a_metered_stream_is_charged_its_real_usage_without_showing_it(gateway):
    client = sdk(gateway, KEY_METERED)
    before = client.models.with_raw_response.list()
    budget = int(before.headers["x-ratelimit-remaining-tokens"])
    # Greedy sampling: both requests below generate the same tokens.
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True, temperature=0))
    assert all(chunk.usage is None for chunk in chunks), "nimgate asked for usage, the client did not"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # The same request again, asking for usage, tells what llama.cpp counted for it.
    counted = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True, temperature=0,
        stream_options={"include_usage": True}))[-1].usage
    after = int(client.models.with_raw_response.list().headers["x-ratelimit-remaining-tokens"])
    charged = budget - after
    # Both streams were charged llama.cpp's real counts (the budget refills 10 tokens a second).
    assert 2 * counted.total_tokens - 5 <= charged <= 2 * counted.total_tokens + 1, (charged, counted)


def test_over_the_request_limit_is_a_rate_limit_error(gateway):
    client = sdk(gateway, KEY_ONE_PER_MINUTE)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert error.value.code == "rate_limit_exceeded"
    assert 1 <= int(error.value.response.headers["retry-after"]) <= 60
    assert error.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_responses_create(client):
    response = client.responses.create(model=SIM_MODEL, input="Write a haiku about GPUs", max_output_tokens=32)
    assert response.status == "completed"
    assert response.output_text.strip()
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 8


def test_responses_stream(client):
    events = list(client.responses.create(model=SIM_MODEL, input=[{"role": "user", "content": "Hi"}], stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 8


def test_responses_stream_helper_and_metering(gateway):
    client = sdk(gateway, KEY_METERED)
    budget = int(client.models.with_raw_response.list().headers["x-ratelimit-remaining-tokens"])
    with client.responses.stream(model=SIM_MODEL, input="Hi", max_output_tokens=100) as stream:
        final = stream.get_final_response()
    after = int(client.models.with_raw_response.list().headers["x-ratelimit-remaining-tokens"])
    # Charged the usage of the terminal event, not the reservation (its prompt + 100); the
    # budget refills 10 tokens a second meanwhile.
    charged = budget - after
    assert final.usage.total_tokens - 5 <= charged <= final.usage.total_tokens, (budget, after, final.usage)


def test_responses_through_llama_cpp(client):
    # llama.cpp's server serves the Responses API too: plain and streamed through nimgate.
    response = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0)
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, stream=True))
    types = [event.type for event in events]
    assert types[-1] in ("response.completed", "response.incomplete"), types
    assert events[-1].response.usage.output_tokens > 0
