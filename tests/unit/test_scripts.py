"""Lua script contracts (headers, keys only from KEYS) and the one code-to-exception map."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from typing import Any

import pytest

from cache import store
from cache.codec import WRITE_FIELDS
from cache.errors import (
    BacklogFull,
    Refused,
    RunEnded,
    ScriptContractError,
    VersionConflict,
)
from cache.scripts import (
    OK,
    OK_OR_NOOP,
    PRELUDE,
    SCRIPT_NAMES,
    Code,
    Scripts,
    check_code,
    prelude_line,
    source,
)
from cache.store import RedisSessionCache

# The codes each store method accepts from its script (cache/store.py and cache/flush_side.py
# pass these to check_code).
ALLOWED: dict[str, frozenset[Code]] = {
    "save": store._SAVE,
    "retire": store._RETIRE,
    "end_owner": store._END,
    "begin_cleanup": OK,
    "mark_cleaned": OK_OR_NOOP,
    "ack_flush": OK,
    "fill": store._FILL,
    "quarantine": OK_OR_NOOP,
    "take_lock": OK_OR_NOOP,
    "release_lock": OK_OR_NOOP,
    "begin_flush": OK_OR_NOOP,
    "open_owner": store._OPEN,
    "settle_owner": OK_OR_NOOP,
    "note_cleanup": OK_OR_NOOP,
    "retry_poisoned": OK_OR_NOOP,
    "drop_poisoned": OK_OR_NOOP,
    "mark_flushing": OK,
}
# Scripts Redis may run over maxmemory: they shrink the backlog (or, load, only renew a TTL).
ALLOW_OOM = {
    "ack_flush",
    "mark_flushing",
    "quarantine",
    "take_lock",
    "release_lock",
    "begin_flush",
    "retry_poisoned",
    "drop_poisoned",
}
# Commands a script may call; each takes exactly one key, as its first argument (TIME: none).
SINGLE_KEY_COMMANDS = {
    "DEL", "EXISTS", "GET", "HDEL", "HEXISTS", "HGET", "HGETALL", "HINCRBY", "HMGET", "HSET",
    "HSETNX", "PERSIST", "PEXPIRE", "PTTL", "RPUSH", "SADD", "SET", "SMEMBERS", "SREM", "ZADD",
    "ZCARD", "ZRANGEBYSCORE", "ZREM", "ZSCORE",
}  # fmt: skip
KEYLESS_COMMANDS = {"TIME"}


@dataclasses.dataclass(frozen=True)
class Parsed:
    name: str
    shebang: str
    header: list[str]
    body: list[str]  # code lines, comments removed

    @property
    def code(self) -> str:
        return "\n".join(self.body)


def script_file(name: str) -> str:
    """The script's own text, as in ``lua/`` (the loader adds the prelude's helpers)."""
    return resources.files("lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


def parse(name: str) -> Parsed:
    shebang, *lines = script_file(name).splitlines()
    n = 0
    while n < len(lines) and lines[n].startswith("--"):
        n += 1
    body = [re.sub(r"--.*$", "", line) for line in lines[n:]]
    return Parsed(name, shebang, lines[:n], [line for line in body if line.strip()])


def header_indices(parsed: Parsed, table: str) -> tuple[set[int], set[int]]:
    """(exact indices, starts of open ranges ``[n..]``) documented for ``table``."""
    exact, ranges = set(), set()
    for line in parsed.header:
        m = re.match(rf"^-- {table}\[(\d+)(\.\.)?\] \S", line)
        if m:
            (ranges if m.group(2) else exact).add(int(m.group(1)))
    return exact, ranges


def body_indices(parsed: Parsed, table: str) -> tuple[set[int], bool]:
    """(literal indices used, whether a computed index like ``KEYS[i]`` is used)."""
    literal = {int(i) for i in re.findall(rf"\b{table}\[(\d+)\]", parsed.code)}
    computed = bool(re.search(rf"\b{table}\[(?!\d+\])", parsed.code))
    return literal, computed


def header_codes(parsed: Parsed) -> dict[int, str]:
    """``{code: NAME}`` from the ``-- returns`` block (``{0, ...}  OK: ...``)."""
    start = next(i for i, line in enumerate(parsed.header) if line.startswith("-- returns"))
    codes: dict[int, str] = {}
    for line in parsed.header[start:]:
        m = re.match(r"^--(?: returns)?\s+\{(\d+)[^}]*\}\s+([A-Z_]+):", line)
        if m:
            codes[int(m.group(1))] = m.group(2)
        else:  # only an indented continuation of the previous code's line may follow
            assert re.match(r"^--\s{4,}\S", line), f"{parsed.name}: unreadable {line!r}"
    return codes


@pytest.fixture(params=SCRIPT_NAMES)
def script(request: pytest.FixtureRequest) -> Parsed:
    return parse(request.param)


def test_every_script_file_is_listed_and_named_like_its_method() -> None:
    files = {p.name for p in resources.files("lua").iterdir() if p.name.endswith(".lua")}
    assert files == {f"{name}.lua" for name in SCRIPT_NAMES} | {f"{PRELUDE}.lua"}
    assert [field.name for field in dataclasses.fields(Scripts)] == list(SCRIPT_NAMES)
    assert all(callable(getattr(RedisSessionCache, name, None)) for name in SCRIPT_NAMES)
    assert set(ALLOWED) == set(SCRIPT_NAMES)


def test_every_script_has_a_shebang_and_only_backlog_shrinkers_may_run_over_maxmemory(
    script: Parsed,
) -> None:
    """With ``#!lua`` Redis refuses a script over maxmemory before it writes anything, instead
    of failing (or, after a first HDEL, not failing) halfway; ``allow-oom`` lets a flush run."""
    expected = "#!lua flags=allow-oom" if script.name in ALLOW_OOM else "#!lua"
    assert script.shebang == expected
    if script.name in ALLOW_OOM:
        assert re.match(r"^-- allow-oom: \S", script.header[1]), "say why it may run over"


def test_header_starts_with_a_purpose_line(script: Parsed) -> None:
    assert re.match(rf"^-- {script.name}: \S.{{10,}}$", script.header[0])


@pytest.mark.parametrize("table", ["KEYS", "ARGV"])
def test_header_documents_exactly_the_indices_the_body_uses(script: Parsed, table: str) -> None:
    exact, ranges = header_indices(script, table)
    literal, computed = body_indices(script, table)
    assert len(ranges) <= 1
    lowest_range = min(ranges, default=None)
    for i in literal:
        covered = i in exact or (lowest_range is not None and i >= lowest_range)
        assert covered, f"{script.name}: {table}[{i}] used but not documented"
    assert exact <= literal, f"{script.name}: {table} {exact - literal} documented, not used"
    assert computed == bool(ranges), f"{script.name}: {table}[n..] vs a computed index"
    documented = sorted(exact | ranges)
    assert documented == list(range(1, len(documented) + 1)), "indices must run 1, 2, ..."
    if lowest_range is not None:
        assert max(exact, default=0) < lowest_range


def test_header_lists_every_return_code_with_its_name(script: Parsed) -> None:
    codes = header_codes(script)
    assert codes, f"{script.name}: no -- returns lines"
    for number, name in codes.items():
        assert Code(number).name == name
    returned = {int(c) for c in re.findall(r"\breturn\s*\{\s*(\d+)", script.code)}
    assert returned <= set(codes), f"{script.name} returns {returned - set(codes)} undocumented"


def test_store_accepts_exactly_the_codes_the_header_lists(script: Parsed) -> None:
    assert {Code(n) for n in header_codes(script)} == ALLOWED[script.name]


def test_no_script_looks_keys_up_or_builds_them(script: Parsed) -> None:
    code = script.code
    assert not re.search(r"redis\.p?call\(\s*'(KEYS|SCAN|EVAL\w*|FCALL\w*)'", code, re.I)
    assert "string.format" not in code
    for name in _key_variables(script):  # a key variable is never rebuilt by concatenation
        assert not re.search(rf"\b{name}\s*\.\.|\.\.\s*{name}\b", code), name


def _key_variables(parsed: Parsed) -> set[str]:
    """Names assigned only from ``KEYS[...]`` expressions."""
    from_keys: set[str] = set()
    other: set[str] = set()
    for line in parsed.body:
        m = re.match(r"^\s*(?:local\s+)?([\w\s,]+?)\s*=(?!=)\s*(.+)$", line)
        if not m:
            continue
        names = [n.strip() for n in m.group(1).split(",")]
        values = [v.strip() for v in m.group(2).split(",")]
        for i, name in enumerate(names):
            value = values[i] if i < len(values) else ""
            (from_keys if re.fullmatch(r"KEYS\[\w+\]", value) else other).add(name)
    return from_keys - other


PRELUDE_KEY_HELPERS = {"give_up_lock": 2}
"""Prelude functions whose first n arguments are keys."""


def test_every_redis_call_takes_its_key_from_keys(script: Parsed) -> None:
    keys = _key_variables(script)
    calls = re.findall(r"redis\.p?call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?", script.code)
    helpers = [
        (helper, args.split(",")[:n])
        for helper, n in PRELUDE_KEY_HELPERS.items()
        for args in re.findall(rf"\b{helper}\(([^)]*)\)", script.code)
    ]
    assert calls or helpers
    for helper, args in helpers:
        for key in (arg.strip() for arg in args):
            assert key in keys or re.fullmatch(r"KEYS\[\w+\]", key), f"{helper} key {key!r}"
    for command, first_arg in calls:
        if command in KEYLESS_COMMANDS:
            continue
        assert command in SINGLE_KEY_COMMANDS, f"{script.name}: unexpected command {command}"
        key = first_arg.strip()
        assert key in keys or re.fullmatch(r"KEYS\[\w+\]", key), (
            f"{script.name}: {command} key {key!r} does not come from KEYS"
        )


# --- check_code -----------------------------------------------------------------------


@pytest.mark.parametrize("reply", [[9], [-1], [99, b"x"]])
def test_check_code_rejects_an_unknown_code(reply: list[Any]) -> None:
    with pytest.raises(ScriptContractError, match="unknown result code"):
        check_code("save", reply, ALLOWED["save"])


@pytest.mark.parametrize(
    "reply", [None, [], b"OK", 0, {"code": 0}, [b"0"], ["0"], [0.0], [None, 1]], ids=repr
)
def test_check_code_rejects_a_malformed_reply(reply: Any) -> None:
    with pytest.raises(ScriptContractError, match="malformed"):
        check_code("save", reply, ALLOWED["save"])


@pytest.mark.parametrize(
    ("script_name", "code"),
    [
        ("retire", Code.EXISTS),
        ("retire", Code.OWNER_ENDED),
        ("fill", Code.NOOP),
        ("ack_flush", Code.VERSION_CONFLICT),
        ("end_owner", Code.BACKLOG_FULL),
        ("begin_cleanup", Code.NOOP),
        ("save", Code.EXISTS),
    ],
)
def test_check_code_rejects_a_code_the_script_does_not_return(script_name: str, code: Code) -> None:
    with pytest.raises(ScriptContractError, match=code.name):
        check_code(script_name, [int(code), 1], ALLOWED[script_name])


def test_check_code_maps_refusals_to_their_exceptions() -> None:
    key = "asc:{s000}:session:t:r:n:b:g"
    with pytest.raises(RunEnded, match=re.escape(key)):
        check_code("save", [1], ALLOWED["save"], key=key)
    with pytest.raises(VersionConflict) as conflict:
        check_code("save", [2, 7], ALLOWED["save"], key=key, expected=3)
    assert (conflict.value.key, conflict.value.expected, conflict.value.actual) == (key, 3, 7)
    with pytest.raises(BacklogFull) as full:
        check_code("save", [3, 50], ALLOWED["save"], key=key)
    assert (full.value.key, full.value.backlog) == (key, 50)
    for error in (RunEnded, VersionConflict, BacklogFull):
        assert issubclass(error, Refused)


def test_check_code_passes_ok_values_and_non_save_run_ended_through() -> None:
    assert check_code("save", [0, 5], ALLOWED["save"]) == (Code.OK, [5])
    assert check_code("end_owner", [1, b"k1", b"k2"], ALLOWED["end_owner"]) == (
        Code.OWNER_ENDED,
        [b"k1", b"k2"],
    )
    assert check_code("retire", [4], ALLOWED["retire"]) == (Code.NOOP, [])


@pytest.mark.parametrize("reply", [[2], [3], [2, b"x"], [3, None]], ids=repr)
def test_check_code_refusal_without_its_value_is_a_contract_error(reply: list[Any]) -> None:
    """A refusal missing its value is malformed, not an IndexError/ValueError (bug 4)."""
    with pytest.raises(ScriptContractError):
        check_code("save", reply, ALLOWED["save"], key="k")


def test_save_script_fields_are_the_codec_write_fields_in_order() -> None:
    """``save`` receives bare values (ARGV[8..]) and names them with its own FIELDS list, so
    that list and :data:`cache.codec.WRITE_FIELDS` must agree field for field."""
    match = re.search(r"local FIELDS = \{(.*?)\}", source("save"), re.DOTALL)
    assert match is not None
    assert tuple(re.findall(r"'([a-z_]+)'", match.group(1))) == WRITE_FIELDS


def test_helpers_are_written_once_and_every_line_keeps_its_number() -> None:
    """``member_of``, ``now_ms``, ``iso_of`` and ``give_up_lock`` live in lua/prelude.lua
    only; the loader puts them on each script's second line, so an error Redis reports at
    line N is the file's line N."""
    for name in SCRIPT_NAMES:
        text = script_file(name)
        assert "local function" not in text, f"{name}.lua defines a helper of its own"
        loaded = source(name).splitlines()
        original = text.splitlines()
        assert len(loaded) == len(original), name
        assert loaded[0] == original[0] and loaded[1].startswith(prelude_line()), name
        assert loaded[1].endswith(original[1]) and loaded[2:] == original[2:], name


def test_the_prelude_refuses_a_comment_after_code() -> None:
    assert "--" not in prelude_line()
