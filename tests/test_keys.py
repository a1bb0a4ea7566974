"""Key naming (no server needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.cluster import key_slot

from credici_redis._core import keys as _keys
from credici_redis.errors import InvalidInputError


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_distinct_users_get_distinct_keys(a: str, b: str) -> None:
    if a != b:  # the slot's event stream and archive outbox are shared by the slot's users
        ka, kb = _keys.user_keys("ns", a), _keys.user_keys("ns", b)
        assert set(ka[:7]).isdisjoint(kb[:7])
        assert ka.events.endswith("}:ev") and ka.outbox.endswith("}:ob")


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=40))
def test_every_key_of_a_user_is_in_one_slot_and_maps_back(user: str, idem: str) -> None:
    own = _keys.user_keys("ns", user)
    keys = [*own, _keys.idempotency_key("ns", user, idem)]
    assert len({key_slot(k.encode()) for k in keys}) == 1  # the slot's shared keys included
    for key in keys:
        assert key.startswith("ns:{")
        if key not in (own.events, own.outbox):  # shared by the users of the slot
            assert _keys.user_from_key("ns", key) == user


def test_readable_for_plain_ids() -> None:
    assert _keys.user_keys("app", "alice").state == "app:{alice}:s"
    assert _keys.user_keys("app", "a:{b}").state == "app:{a%3A%7Bb%7D}:s"


@pytest.mark.parametrize("ns", ["", "a{b", "a}b", "a b", "x" * 65, "a:b", None])
def test_bad_namespaces_are_rejected(ns: object) -> None:
    with pytest.raises(InvalidInputError):
        _keys.check_namespace(ns)  # type: ignore[arg-type]


def test_transaction_ids_carry_the_user() -> None:
    assert _keys.transaction_id("a@b", "17-0") == "17-0@a%40b"


def test_every_slot_has_an_event_stream_tag() -> None:
    tags = [_keys.slot_tag(slot) for slot in range(_keys.SLOTS)]
    assert [key_slot(f"ns:{{{tag}}}:ev".encode()) for tag in tags] == list(range(_keys.SLOTS))
    assert all(tag.startswith("%S") for tag in tags)  # never a percent-encoded user id


def test_an_event_stream_key_and_its_slot_tag_go_both_ways() -> None:
    user = _keys.user_keys("app", "alice")
    tag = _keys.slot_tag(_keys.user_slot("alice"))
    assert _keys.events_key("app", tag) == user.events
    assert _keys.events_tag("app", user.events) == tag
    for wrong in ("app:{alice}:s", "other:{%S1}:ev", "app:%S1:ev"):
        with pytest.raises(ValueError):
            _keys.events_tag("app", wrong)
