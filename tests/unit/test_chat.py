import pytest

from tidegate.chat import ChatMessage, GenerationRequest, SamplingParams
from tidegate.errors import InvalidArgument


def request(*messages: tuple[str, str], **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        tuple(ChatMessage(r, c) for r, c in messages),
        SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def test_a_plain_question_is_valid() -> None:
    request(("system", "be brief"), ("user", "hi")).validate(2048)


@pytest.mark.parametrize(
    ("messages", "sampling", "fragment"),
    [
        ((), {}, "conversation is empty"),
        ((("user", "   "),), {}, "question is empty"),
        ((("wizard", "hi"), ("user", "hi")), {}, "unknown role 'wizard'"),
        ((("user", "hi"), ("assistant", "yo")), {}, "last message must come from the user"),
        ((("user", "hi"),), {"max_new_tokens": 0}, "at least 1"),
        ((("user", "hi"),), {"max_new_tokens": -5}, "at least 1"),
        ((("user", "hi"),), {"max_new_tokens": 4097}, "over this server's limit of 2048"),
        ((("user", "hi"),), {"temperature": 3.0}, "temperature"),
        ((("user", "hi"),), {"top_p": 0.0}, "top_p"),
        ((("user", "hi"),), {"stop": ("",)}, "stop"),
    ],
)
def test_bad_requests_are_rejected_with_a_reason(messages, sampling, fragment) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        request(*messages, **sampling).validate(2048)


def test_sampling_roundtrips_through_protobuf() -> None:
    params = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("\n",))
    assert SamplingParams.from_pb(params.to_pb()) == params
    assert SamplingParams.from_pb(SamplingParams().to_pb()) == SamplingParams()


def test_default_max_new_tokens_only_fills_a_gap() -> None:
    assert SamplingParams().with_default_max_new_tokens(9).max_new_tokens == 9
    assert SamplingParams(max_new_tokens=3).with_default_max_new_tokens(9).max_new_tokens == 3
