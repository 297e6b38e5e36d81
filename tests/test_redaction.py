"""Tests for agentrun.redaction: secret keys, secret-looking strings and redactedPaths."""

from __future__ import annotations

import copy

import pytest

from agentrun.redaction import REDACTED, is_secret_key, redact, redact_text

# Fake tokens built here so no real-looking secret sits in the source.
GHP = "ghp_" + "a" * 36
SK = "sk-" + "b" * 20
SK_PROJ = "sk-proj-" + "c" * 24
SK_ANT = "sk-ant-" + "d" * 30
GITHUB_PAT = "github_pat_" + "e" * 22
SLACK = "xoxb-" + "1" * 10
AWS = "AKIA" + "Z" * 16
PEM_LABELS = ["", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED "]


def pem_block(label: str = "RSA ") -> str:
    body = "MIIB" + "q" * 40 + "\n" + "x" * 40 + "=="
    return f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----"


# --- is_secret_key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "secret",
        "password",
        "passwd",
        "apikey",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "privatekey",
        "githubToken",
        "GITHUB_TOKEN",
        "clientSecret",
        "db-password",
        "userPasswd",
        "api_key",
        "X-Api-Key",
        "private_key",
        "Authorization",
        "sessionCookie",
        "awsCredentials",
        "gcp_credential",
        "Private-Key",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["inputTokens", "credentialRef", "tokenizer", "passwordless", "cookies", "secrets", "name", ""],
)
def test_non_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


# --- redact_text: each pattern, positive and too-short negative ------------------------------


@pytest.mark.parametrize(
    "token",
    [
        GHP,
        "gho_" + "A" * 36,
        "ghu_" + "0" * 36,
        "ghs_" + "b1" * 18,
        "ghr_" + "Z" * 40,
        SK,
        SK_PROJ,
        SK_ANT,
        "sk-" + "a_b-" * 6,
        GITHUB_PAT,
        "github_pat_" + "a1_" * 20,
        SLACK,
        "xoxa-" + "a-b" * 5,
        "xoxp-" + "9" * 20,
        "xoxr-" + "x" * 10,
        AWS,
        "AKIA" + "A1B2" * 4,
    ],
)
def test_token_patterns_redacted(token: str) -> None:
    assert redact_text(token) == (REDACTED, True)
    assert redact_text(f"before {token} after") == (f"before {REDACTED} after", True)


@pytest.mark.parametrize(
    "text",
    [
        "sk-short",
        "sk-" + "b" * 19,
        "ghp_abc",
        "ghp_" + "a" * 35,
        "gho_" + "a" * 35,
        "ghx_" + "a" * 36,
        "github_pat_" + "e" * 21,
        "xoxb-" + "1" * 9,
        "xoxc-" + "1" * 20,
        "AKIA" + "Z" * 15,
        "AKIA" + "Z" * 17,
        "x" + AWS,
        "akia" + "z" * 16,
        "Bearer short",
        "Bearer 1234567",
        "the bearer of",
        "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----",
        "",
        "plain text",
    ],
)
def test_lookalikes_not_redacted(text: str) -> None:
    assert redact_text(text) == (text, False)


def test_in_place_substring_replacement() -> None:
    assert redact_text(f"export T={GHP}") == (f"export T={REDACTED}", True)
    assert redact_text(f"a={SK};b={SLACK}.") == (f"a={REDACTED};b={REDACTED}.", True)


def test_bearer_keeps_prefix() -> None:
    text = "Authorization header: Bearer abc.def.ghi123"
    assert redact_text(text) == (f"Authorization header: Bearer {REDACTED}", True)
    assert redact_text("bearer Ab+/=~._-9") == (f"bearer {REDACTED}", True)
    assert redact_text("BEARER\tabcdefgh next") == (f"BEARER\t{REDACTED} next", True)


def test_bearer_swallows_inner_token() -> None:
    assert redact_text(f"Bearer {SK}") == (f"Bearer {REDACTED}", True)


@pytest.mark.parametrize("label", PEM_LABELS)
def test_pem_block(label: str) -> None:
    text = f"key:\n{pem_block(label)}\ntrailing line"
    assert redact_text(text) == (f"key:\n{REDACTED}\ntrailing line", True)


def test_pem_block_without_end_runs_to_end_of_string() -> None:
    text = "start\n-----BEGIN PRIVATE KEY-----\nMIIB" + "q" * 40 + "\nmore"
    assert redact_text(text) == (f"start\n{REDACTED}", True)


def test_pem_end_must_match_label() -> None:
    text = "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\ntail"
    assert redact_text(text) == (REDACTED, True)


def test_two_pem_blocks_redacted_separately() -> None:
    text = f"{pem_block('')}\nmiddle\n{pem_block('EC ')}"
    assert redact_text(text) == (f"{REDACTED}\nmiddle\n{REDACTED}", True)


# --- redact ----------------------------------------------------------------------------------


def test_clean_payload_has_no_redacted_paths() -> None:
    payload = {"a": 1, "b": [True, None, 2.5, "ok"], "c": {"inputTokens": 12}}
    result = redact(payload)
    assert result == payload
    assert "redactedPaths" not in result
    assert result is not payload


def test_empty_payload() -> None:
    assert redact({}) == {}


@pytest.mark.parametrize("value", [{"nested": "x"}, ["a", "b"], 42, 0, None, True, "", 1.5])
def test_secret_key_value_replaced_whole(value: object) -> None:
    result = redact({"apiKey": value, "other": value})
    assert result["apiKey"] == REDACTED
    assert result["other"] == value
    assert result["redactedPaths"] == ["/apiKey"]


def test_nested_pointers() -> None:
    payload = {
        "env": {"GITHUB_TOKEN": "x", "HOME": "/root"},
        "lines": ["ok", "fine", f"export T={GHP}"],
        "deep": [{"items": [{"password": "p"}]}],
    }
    result = redact(payload)
    assert result["env"] == {"GITHUB_TOKEN": REDACTED, "HOME": "/root"}
    assert result["lines"] == ["ok", "fine", f"export T={REDACTED}"]
    assert result["deep"] == [{"items": [{"password": REDACTED}]}]
    assert result["redactedPaths"] == ["/deep/0/items/0/password", "/env/GITHUB_TOKEN", "/lines/2"]


def test_pointer_escaping() -> None:
    result = redact({"a/b": {"c~d": SK, "e~/f": {"token": 1}}})
    assert result["redactedPaths"] == ["/a~1b/c~0d", "/a~1b/e~0~1f/token"]


def test_redacted_paths_sorted_as_plain_strings() -> None:
    payload = {"z": SK, "B": SK, "a": {"secret": 1}, "list": [SK] * 11}
    result = redact(payload)
    paths = result["redactedPaths"]
    assert paths == sorted(paths)
    assert paths[:3] == ["/B", "/a/secret", "/list/0"]
    # Plain string sort puts "/list/10" before "/list/2".
    assert paths.index("/list/10") < paths.index("/list/2")
    assert len(paths) == len(set(paths)) == 14


def test_keys_never_changed() -> None:
    result = redact({GHP: "value", "k": {SK: 1}})
    assert result == {GHP: "value", "k": {SK: 1}}
    assert "redactedPaths" not in result


def test_non_string_scalars_untouched() -> None:
    payload = {"n": 12345678901234567890, "f": 0.5, "b": False, "none": None, "s": SK}
    result = redact(payload)
    assert {k: result[k] for k in ("n", "f", "b", "none")} == {
        "n": 12345678901234567890,
        "f": 0.5,
        "b": False,
        "none": None,
    }
    assert result["redactedPaths"] == ["/s"]


def test_strings_in_lists_of_lists() -> None:
    result = redact({"m": [["x", [f"Bearer {'t' * 10}"]]]})
    assert result["m"] == [["x", [f"Bearer {REDACTED}"]]]
    assert result["redactedPaths"] == ["/m/0/1/0"]


def test_input_not_mutated() -> None:
    payload = {
        "env": {"TOKEN": "abc", "keep": {"x": [1, 2]}},
        "lines": [SK, {"cookie": "c"}],
        "redactedPaths": ["/old"],
    }
    before = copy.deepcopy(payload)
    result = redact(payload)
    assert payload == before
    assert result["env"] is not payload["env"]
    assert result["lines"] is not payload["lines"]
    assert result["lines"][1] is not payload["lines"][1]


def test_existing_redacted_paths_overwritten_when_redacting() -> None:
    result = redact({"redactedPaths": ["/bogus"], "token": "t"})
    assert result["redactedPaths"] == ["/token"]


def test_existing_redacted_paths_kept_when_clean() -> None:
    result = redact({"redactedPaths": ["/bogus"], "a": 1})
    assert result == {"redactedPaths": ["/bogus"], "a": 1}


def test_top_level_string_and_pem_value() -> None:
    result = redact({"msg": f"here\n{pem_block()}", "note": AWS + " used"})
    assert result["msg"] == f"here\n{REDACTED}"
    assert result["note"] == f"{REDACTED} used"
    assert result["redactedPaths"] == ["/msg", "/note"]


def test_idempotent() -> None:
    payload = {
        "env": {"GITHUB_TOKEN": GHP, "PATH": "/bin"},
        "lines": [f"token is {SK_PROJ}", "ok", pem_block()],
        "credentials": {"user": "u", "pass": "p"},
        "a/b": [f"Bearer {'z' * 12}"],
    }
    once = redact(payload)
    twice = redact(once)
    assert twice == once
    for key in payload:
        assert twice[key] == once[key]


def test_already_redacted_secret_value_not_listed() -> None:
    result = redact({"password": REDACTED})
    assert result == {"password": REDACTED}


def test_deep_nesting_has_no_recursion_limit() -> None:
    payload: dict = {}
    node = payload
    for _ in range(5000):
        node["n"] = {}
        node = node["n"]
    node["token"] = "t"
    result = redact(payload)
    assert result["redactedPaths"] == ["/n" * 5000 + "/token"]


def test_token_prefixes_inside_words_are_not_tokens():
    # "task-" and "mask-" end in "sk-"; an id like that is no key.
    text = "task-" + "a" * 24 + " and xghp_" + "b" * 36
    assert redact_text(text) == (text, False)
    assert redact_text("key sk-" + "c" * 24) == ("key [REDACTED]", True)
