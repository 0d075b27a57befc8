"""The fleet router (tokenmill/fleet/router.py): by model name, least outstanding tokens among a
model's replicas, prefix affinity unless the affine replica is much busier, replicas down
skipped, a model with none up unavailable with a retry time."""

from __future__ import annotations

import pytest

from tokenmill.fleet.router import SLACK_TOKENS, Router, Unavailable, UnknownModel

CHAT = list(range(1000, 1300))  # a 300-token conversation prefix
OTHER = list(range(5000, 5300))


def router() -> Router:
    return Router({"chat": ["chat#0", "chat#1"], "code": ["code"]})


def test_requests_go_by_model_and_spread_over_idle_replicas():
    r = router()
    assert r.models() == ["chat", "code"] and r.replicas("chat") == ["chat#0", "chat#1"]
    assert r.pick("code", [1, 2, 3]) == "code"
    first = r.pick("chat", [1, 2, 3])
    second = r.pick("chat", [4, 5, 6])
    assert {first, second} == {"chat#0", "chat#1"}  # idle replicas take turns
    with pytest.raises(UnknownModel, match="'gpt-4' does not exist; this server serves 'chat', 'code'"):  # fmt: skip
        r.pick("gpt-4", [1])


def test_least_outstanding_tokens_wins():
    r = router()
    r.started("a", "chat#0", 500)
    assert r.pick("chat", [7, 8]) == "chat#1"
    r.started("b", "chat#1", 900)
    assert r.pick("chat", [9]) == "chat#0"
    r.finished("b")
    assert r.load() == {"chat#0": 500, "chat#1": 0, "code": 0}
    assert r.pick("chat", [10]) == "chat#1"
    r.finished("b")  # twice: nothing more to take off
    assert r.load()["chat#1"] == 0


def test_a_conversation_returns_to_the_replica_holding_its_prefix():
    r = router()
    home = r.pick("chat", CHAT)
    r.started("t1", home, 1000)
    other = "chat#1" if home == "chat#0" else "chat#0"
    assert r.pick("chat", CHAT + [1, 2, 3]) == home  # busier by 1000, within the slack
    assert r.pick("chat", OTHER) == other  # a new prefix goes to the idle one
    r.started("t2", home, SLACK_TOKENS + 10)  # now much busier: load beats affinity
    assert r.pick("chat", CHAT + [4]) == other
    assert r.pick("chat", CHAT + [5]) == other  # and the prefix moved with it


def test_down_replicas_are_skipped_and_a_model_with_none_up_is_unavailable():
    r = router()
    r.started("x", "chat#0", 100)
    r.mark_down("chat#0", retry_after=7)
    assert r.load()["chat#0"] == 0  # its requests died with it
    assert all(r.pick("chat", [i]) == "chat#1" for i in range(5))
    r.mark_down("chat#1", retry_after=3)
    with pytest.raises(Unavailable) as e:
        r.pick("chat", [1])
    assert e.value.retry_after == 3 and "no instance up" in str(e.value)
    assert r.pick("code", [1]) == "code"  # the other model keeps serving
    r.mark_up("chat#0")
    assert r.pick("chat", [1]) == "chat#0"


def test_prefix_memory_is_bounded():
    r = Router({"chat": ["a", "b"]}, memory=8)
    for i in range(100):
        r.pick("chat", list(range(i * 100, i * 100 + 300)))
    assert len(r._prefixes) <= 8


def test_bad_replica_tables():
    with pytest.raises(ValueError, match="at least one replica"):
        Router({"chat": []})
    with pytest.raises(ValueError, match="unique"):
        Router({"a": ["x"], "b": ["x"]})
