"""Key names: percent-encoding, parsing back, hash tags and shards (no services)."""

from __future__ import annotations

import re
import zlib

import pytest

from cache.errors import InvalidId
from cache.keys import KeySpace, decode_id, encode_id
from cache.records import Owner, OwnerType, SessionKey
from tests import factories as f

AWKWARD_IDS = [
    "plain-ID_1.2",
    "a:b",
    "a/b",
    "100%",
    "%41",
    "~home",
    "with space",
    "tab\there",
    "{s001}",
    "ünïcødé-日本語-🙂",
    "x" * 255,
    "%" * 255,
    ":",
]


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("a:b", "a%3Ab"),
        ("a/b", "a%2Fb"),
        ("50%", "50%25"),
        ("~x", "%7Ex"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
        ("{s1}", "%7Bs1%7D"),
        ("Az09._-", "Az09._-"),
    ],
)
def test_encode_id_percent_encodes_outside_the_safe_set(raw: str, encoded: str) -> None:
    assert encode_id(raw) == encoded
    assert decode_id(encoded) == raw


@pytest.mark.parametrize("raw", AWKWARD_IDS)
def test_encoded_ids_use_only_safe_characters_and_round_trip(raw: str) -> None:
    encoded = encode_id(raw)
    assert re.fullmatch(r"[A-Za-z0-9._%-]+", encoded)
    assert decode_id(encoded) == raw


@pytest.mark.parametrize("raw", AWKWARD_IDS)
def test_parse_session_round_trips_awkward_ids(raw: str) -> None:
    space = KeySpace("asc", 256)
    key = SessionKey(raw, raw, raw, raw, raw)
    name = space.session(key)
    assert space.parse_session(name) == key
    assert space.parse_session(name.encode()) == key
    assert name.count(":") == 7  # prefix, tag, "session" and five parts: no stray separator


def test_different_ids_never_share_a_key_name() -> None:
    space = KeySpace()
    a = SessionKey("t", "a:b", "n", "b", "g")
    b = SessionKey("t", "a", "b:n", "b", "g")  # same characters, different split
    assert space.session(a) != space.session(b)


def test_key_layout_is_the_documented_one() -> None:
    space = KeySpace("asc", 256)
    key = f.session_key(tenant="t", run="r", node="n", binding="b", agent="g")
    shard = zlib.crc32(b"t:r") % 256
    tag = f"{{s{shard:03d}}}"
    run = Owner("t", "r")
    assert space.session(key) == f"asc:{tag}:session:t:r:n:b:g"
    assert space.owner(run) == f"asc:{tag}:run:t:r"
    assert space.owner_sessions(run) == f"asc:{tag}:run:t:r:sessions"
    assert space.dirty(shard) == f"asc:{tag}:dirty"
    assert space.poison(shard) == f"asc:{tag}:poison"
    assert space.meta == "asc:meta"


@pytest.mark.parametrize(("tenant", "run"), [("t", "r"), ("tenant:x", "run/1"), ("é", "日本")])
@pytest.mark.parametrize("shards", [1, 7, 256, 16384])
def test_shard_of_is_crc32_of_tenant_and_run_modulo_shards(
    tenant: str, run: str, shards: int
) -> None:
    space = KeySpace("asc", shards)
    expected = zlib.crc32(f"{tenant}:{run}".encode()) % shards
    assert space.shard_of(tenant, run) == expected
    assert space.shard_of_key(f.session_key(tenant=tenant, run=run)) == expected


@pytest.mark.parametrize("raw", AWKWARD_IDS)
def test_every_key_of_one_run_shares_one_hash_tag(raw: str) -> None:
    space = KeySpace("p", 256)
    key = SessionKey(raw, raw, "n", "b", "g")
    run = Owner(raw, raw)
    shard = space.shard_of(raw, raw)
    names = [
        space.session(key),
        space.session(SessionKey(raw, raw, "other", raw, raw)),
        space.owner(run),
        space.owner_sessions(run),
        space.dirty(shard),
        space.poison(shard),
    ]
    tags = {re.findall(r"\{[^}]*\}", name)[0] for name in names}
    assert tags == {space.tag(shard)}
    # Redis hashes the first {...}: nothing before the tag may contain a brace.
    assert all(name.index("{") == len("p:") for name in names)


def test_sessions_of_many_runs_spread_over_shards() -> None:
    space = KeySpace("asc", 16)
    shards = {space.shard_of("t", f"run-{i}") for i in range(200)}
    assert shards == set(range(16))


@pytest.mark.parametrize(
    "name",
    [
        "other:{s000}:session:t:r:n:b:g",  # wrong prefix
        "asc:{s000}:run:t:r:n:b:g",  # not a session
        "asc:{s000}:session:t:r:n:b",  # four parts
        "asc:{s000}:session:t:r:n:b:g:x",  # six parts
        "asc:{s000}:session:t:r::b:g",  # empty part
        "asc:{s000}:session:t:r:n b:b:g",  # unencoded character
        "asc:{s000}:session:t:r:%6e:b:g",  # non-canonical encoding of "n"
        "asc:s000:session:t:r:n:b:g",  # no tag braces
    ],
)
def test_parse_session_rejects_foreign_names(name: str) -> None:
    space = KeySpace("asc", 2)
    good = space.session(SessionKey("t", "r", "n", "b", "g"))
    assert good != name
    with pytest.raises(InvalidId):
        space.parse_session(name)


def test_parse_session_rejects_a_wrong_shard_tag() -> None:
    space = KeySpace("asc", 2)
    good = space.session(SessionKey("t", "r", "n", "b", "g"))
    other = 1 - space.shard_of("t", "r")
    wrong = good.replace(space.tag(space.shard_of("t", "r")), space.tag(other))
    assert wrong != good
    with pytest.raises(InvalidId, match="shard tag"):
        space.parse_session(wrong)


def test_parse_session_rejects_a_key_built_with_another_shard_count() -> None:
    key = SessionKey("t", "some-run", "n", "b", "g")
    a, b = KeySpace("asc", 256), KeySpace("asc", 255)
    assert a.shard_of("t", "some-run") != b.shard_of("t", "some-run")
    with pytest.raises(InvalidId):
        b.parse_session(a.session(key))


def test_parse_session_rejects_percent_escapes_that_are_not_utf8() -> None:
    """A foreign name must fail as InvalidId, not leak UnicodeDecodeError (bug 2)."""
    space = KeySpace("asc", 1)
    with pytest.raises(InvalidId):
        space.parse_session("asc:{s000}:session:%FF:r:n:b:g")
    with pytest.raises(InvalidId):
        decode_id("%C3")


@pytest.mark.parametrize("raw", AWKWARD_IDS)
@pytest.mark.parametrize("owner", list(OwnerType))
def test_run_member_is_the_end_of_the_session_name_the_scripts_cut(
    raw: str, owner: OwnerType
) -> None:
    """save/fill/begin_cleanup/drop_poisoned derive the member as the session name after its
    fifth ``:`` (``member_of``), which is its last three parts whatever the IDs and the owner:
    the prefix (Settings allows no ``:``) and the shard tag hold none."""
    space = KeySpace("my.prefix-1", 256)
    key = SessionKey.of_parts(owner, raw, raw, raw, raw, raw)
    member = space.owner_member(key)
    name = space.session(key)
    assert name.split(":", 5)[5] == member
    assert re.search(r":([^:]+:[^:]+:[^:]+)$", name)[1] == member  # type: ignore[index]
    assert member.count(":") == 2
    assert space.parse_owner_member(key.owner, member) == key
    assert space.parse_owner_member(key.owner, member.encode()) == key
    assert space.parse_session(name) == key


def test_a_key_name_says_its_owner() -> None:
    space = KeySpace("asc", 256)
    conversation = SessionKey.conversation("t", "c", "b", "a", "cfg")
    workflow = SessionKey("t", "c", "b", "a", "cfg")  # the same five IDs
    assert space.session(conversation).split(":")[2:] == [
        "conversation-session",
        "t",
        "c",
        "b",
        "a",
        "cfg",
    ]
    assert space.session(workflow).split(":")[2] == "session"
    assert space.owner(conversation.owner).split(":")[2:] == ["conversation", "t", "c"]
    assert space.owner(workflow.owner).split(":")[2:] == ["run", "t", "c"]
    assert space.names(conversation).config_field == "config:b:a"
    assert space.names(workflow).config_field == ""


def test_a_full_session_name_is_read_as_a_legacy_run_member() -> None:
    space = KeySpace("asc", 256)
    key = f.session_key()
    run = f.run_of(key)
    assert space.parse_owner_member(run, space.session(key)) == key
    other = f.session_key(run="another-run")
    with pytest.raises(InvalidId):
        space.parse_owner_member(run, space.session(other))  # a name of another run


@pytest.mark.parametrize("member", ["", "n:b", "n:b:a:x", "n:b:a%ZZ", "asc:{s001}:session:x"])
def test_malformed_run_members_are_refused(member: str) -> None:
    with pytest.raises(InvalidId):
        KeySpace("asc", 256).parse_owner_member(Owner("t", "r"), member)
