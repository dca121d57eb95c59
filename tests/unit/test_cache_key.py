"""router.cache_key: the whole conversation, tenant and sampling make the key."""

from __future__ import annotations

import pytest

from router.cache_key import cache_key, canonical_request
from tidegate.chat import ChatMessage, SamplingParams

BASE_MESSAGES = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "What is 2+2?"),
    ChatMessage("assistant", "4"),
    ChatMessage("user", "And 3+3?"),
)
BASE_SAMPLING = SamplingParams(max_new_tokens=64)


def key(tenant="t1", messages=BASE_MESSAGES, sampling=BASE_SAMPLING) -> str:
    return cache_key(tenant, messages, sampling)


def test_same_request_same_key_and_hex_sha256():
    assert key() == key()
    assert len(key()) == 64 and int(key(), 16) >= 0


def test_equal_but_distinct_objects_hash_equal():
    messages = tuple(ChatMessage(m.role, str(m.content)) for m in BASE_MESSAGES)
    assert key(messages=messages, sampling=SamplingParams(max_new_tokens=64, stop=())) == key()


def test_tenant_changes_the_key():
    assert key(tenant="t2") != key()
    assert key(tenant="") != key()


@pytest.mark.parametrize("index", range(len(BASE_MESSAGES)))
def test_any_message_content_changes_the_key(index):
    messages = list(BASE_MESSAGES)
    messages[index] = ChatMessage(messages[index].role, messages[index].content + "!")
    assert key(messages=tuple(messages)) != key()


def test_role_change_and_system_prompt_change_the_key():
    changed_role = (ChatMessage("user", "You are terse."), *BASE_MESSAGES[1:])
    assert key(messages=changed_role) != key()
    without_system = BASE_MESSAGES[1:]
    assert key(messages=without_system) != key()


def test_message_boundaries_matter():
    a = (ChatMessage("user", "ab"), ChatMessage("user", "c"))
    b = (ChatMessage("user", "a"), ChatMessage("user", "bc"))
    assert key(messages=a) != key(messages=b)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_new_tokens=65),
        SamplingParams(max_new_tokens=64, temperature=0.7),
        SamplingParams(max_new_tokens=64, top_p=0.9),
        SamplingParams(max_new_tokens=64, seed=1),
        SamplingParams(max_new_tokens=64, stop=("\n",)),
        SamplingParams(max_new_tokens=64, stop=("a", "b")),
    ],
)
def test_any_sampling_change_changes_the_key(sampling):
    assert key(sampling=sampling) != key()


def test_stop_order_is_significant_but_stable():
    assert key(sampling=SamplingParams(max_new_tokens=64, stop=("a", "b"))) != key(
        sampling=SamplingParams(max_new_tokens=64, stop=("b", "a"))
    )


def test_defaults_must_be_applied_first():
    with pytest.raises(ValueError, match="default max_new_tokens"):
        canonical_request("t", BASE_MESSAGES, SamplingParams())


def test_unicode_is_hashed_not_mangled():
    a = (ChatMessage("user", "café"),)
    b = (ChatMessage("user", "cafe\u0301"),)  # same glyphs, different code points
    assert key(messages=a) != key(messages=b)
