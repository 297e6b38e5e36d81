"""The runner's outgoing payloads, without a server: measured as the compact UTF-8 JSON sent,
shortened to 256 KiB keeping head and tail, batched to the API's limits, and shown plainly by
the CLI."""

from __future__ import annotations

import io
import json
import random
import re

import pytest

from runner.cli import Out, size_text
from runner.client import Backoff
from runner.payloads import MAX_PAYLOAD_BYTES, cut_string, json_bytes, shorten, utf8_length
from runner.sink import MAX_KEY_LENGTH, Batch, _key_prefix, prepare

MARKER = re.compile(r"…\[(\d+) bytes cut\]…")


def size(payload) -> int:
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def assert_cut(original: str, kept: str) -> int:
    """`kept` is `original`'s head, one marker, and its tail, the marker counting exactly the
    UTF-8 bytes left out. Returns that count."""
    [match] = list(MARKER.finditer(kept))
    head, tail = kept[: match.start()], kept[match.end() :]
    assert original.startswith(head) and original.endswith(tail)
    cut = int(match.group(1))
    assert cut == utf8_length(original) - utf8_length(head) - utf8_length(tail) > 0
    return cut


# --- measuring ------------------------------------------------------------------------------------


def test_a_payload_is_measured_as_its_compact_utf8_json():
    payload = {"output": "héllo 😀", "n": [1, 2.5, None, True]}
    assert json_bytes(payload) == json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def test_a_lone_surrogate_goes_as_an_escape_in_valid_utf8():
    encoded = json_bytes({"output": "a\udc80b é"})
    assert encoded == '{"output":"a\\udc80b é"}'.encode()
    assert json.loads(encoded.decode("utf-8")) == {"output": "a\udc80b é"}


def test_nul_goes_as_an_escape_and_nan_as_a_string():
    assert json_bytes({"output": "a\x00b"}) == b'{"output":"a\\u0000b"}'
    assert json.loads(json_bytes({"x": float("nan"), "y": [float("inf")]})) == {"x": "nan", "y": ["inf"]}


# --- shortening -----------------------------------------------------------------------------------


def test_a_payload_that_fits_is_left_as_it_is():
    payload = {"output": "x" * (MAX_PAYLOAD_BYTES - 20)}
    assert size(payload) <= MAX_PAYLOAD_BYTES
    assert shorten(payload) is payload


def test_a_payload_over_256_kib_keeps_head_and_tail_and_counts_the_bytes_cut():
    output = "".join(f"line {i}\n" for i in range(200_000))  # about 1.5 MB
    payload = {"command": "seq", "output": output, "exitCode": 0}
    shortened = shorten(payload)
    assert MAX_PAYLOAD_BYTES - 64 <= size(shortened) <= MAX_PAYLOAD_BYTES  # cut to fit, not far below
    assert shortened["command"] == "seq" and shortened["exitCode"] == 0
    assert shortened["output"].startswith("line 0\nline 1\n") and shortened["output"].endswith("line 199999\n")
    assert shortened["truncatedBytes"] == assert_cut(output, shortened["output"])
    assert payload["output"] == output  # the caller's payload is not changed


def test_the_longest_strings_are_cut_first_and_evenly():
    payload = {"a": "a" * 600_000, "b": "b" * 100_000, "c": "short"}
    shortened = shorten(payload)
    assert size(shortened) <= MAX_PAYLOAD_BYTES
    assert shortened["b"] == payload["b"] and shortened["c"] == "short"
    assert shortened["truncatedBytes"] == assert_cut(payload["a"], shortened["a"])

    twins = shorten({"a": "a" * 300_000, "b": "b" * 300_000})
    assert abs(len(twins["a"]) - len(twins["b"])) <= 2
    assert twins["truncatedBytes"] == assert_cut("a" * 300_000, twins["a"]) + assert_cut("b" * 300_000, twins["b"])


def test_strings_deep_in_the_payload_are_cut_and_a_count_already_there_is_added_to():
    payload = {"truncatedBytes": 10, "items": [{"text": "é" * 200_000}, {"text": "ok"}], "meta": {"log": "z" * 90_000}}
    shortened = shorten(payload)
    assert size(shortened) <= MAX_PAYLOAD_BYTES
    cut = assert_cut(payload["items"][0]["text"], shortened["items"][0]["text"])
    assert shortened["items"][1] == {"text": "ok"} and shortened["meta"] == payload["meta"]
    assert shortened["truncatedBytes"] == 10 + cut


@pytest.mark.parametrize("seed", range(12))
def test_hostile_text_is_cut_to_fit_and_stays_valid_json(seed):
    """NUL (six bytes of JSON each), controls, quotes, multibyte and astral characters, lone
    surrogates: whatever the mix, the result fits, reads back, and keeps a true head and tail."""
    rng = random.Random(seed)
    alphabet = ["a", "\x00", "\x1f", '"', "\\", "é", "€", "😀", "\udc80", "\n"]
    weights = [rng.random() for _ in alphabet]
    strings = ["".join(rng.choices(alphabet, weights, k=rng.randrange(1, 400_000))) for _ in range(rng.randrange(1, 4))]
    payload = {f"s{i}": text for i, text in enumerate(strings)} | {"exitCode": 1}
    shortened = shorten(payload)
    encoded = json_bytes(shortened)
    assert len(encoded) <= MAX_PAYLOAD_BYTES
    assert json.loads(encoded.decode("utf-8"))["exitCode"] == 1
    if shortened is payload:
        assert len(json_bytes(payload)) <= MAX_PAYLOAD_BYTES
        return
    cut = sum(assert_cut(text, shortened[f"s{i}"]) for i, text in enumerate(strings) if shortened[f"s{i}"] != text)
    assert shortened["truncatedBytes"] == cut


def test_a_payload_of_many_small_values_is_kept_as_shortened_json_text():
    payload = {"items": [f"item-{i}" for i in range(100_000)]}
    shortened = shorten(payload)
    assert set(shortened) == {"truncatedPayload", "truncatedBytes"}
    assert size(shortened) <= MAX_PAYLOAD_BYTES
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    assert shortened["truncatedPayload"].startswith('{"items":["item-0","item-1"')
    assert shortened["truncatedPayload"].endswith('"item-99999"]}')
    assert shortened["truncatedBytes"] == assert_cut(text, shortened["truncatedPayload"])


def test_a_string_cut_below_the_marker_size_still_shows_the_marker():
    kept, cut = cut_string("x" * 1000, 5)
    assert kept == "…[1000 bytes cut]…" and cut == 1000


# --- events and batches ---------------------------------------------------------------------------


def test_an_event_is_encoded_once_with_its_payload_shortened():
    event = prepare(3, "command_output", {"output": "x" * 1_500_000})
    decoded = json.loads(event.data)
    assert decoded["type"] == "command_output" and decoded["payload"]["truncatedBytes"] > 1_200_000
    assert event.payload_bytes == size(decoded["payload"]) <= MAX_PAYLOAD_BYTES and event.position == 3


def test_batch_keys_name_the_positions_they_span_and_splits_have_keys_of_their_own():
    batch = Batch(tuple(prepare(i, "usage", {"i": i}) for i in range(10, 20)))
    assert batch.key("r:2") == "r:2:10-19"
    halves = batch.split(None)
    assert [part.key("r:2") for part in halves] == ["r:2:10-14", "r:2:15-19"]
    around = batch.split(4)
    assert [part.key("r:2") for part in around] == ["r:2:10-13", "r:2:14-14", "r:2:15-19"]
    assert [part.key("r:2") for part in batch.split(0)] == ["r:2:10-10", "r:2:11-19"]
    assert [part.key("r:2") for part in batch.split(99)] == ["r:2:10-14", "r:2:15-19"]  # a bad index: halves
    assert Batch(batch.events[:1], replacement=True).key("r:2") == "r:2:10-10-rejected"


def test_a_long_runner_id_is_hashed_so_keys_stay_within_their_limit():
    prefix = _key_prefix("r" * 200, 7)
    assert prefix.endswith(":7") and len(prefix) < 60
    assert len(Batch((prepare(10**12, "usage", {}),)).key(prefix)) <= MAX_KEY_LENGTH
    assert _key_prefix("runner-abc", 7) == "runner-abc:7"


def test_backoff_doubles_with_jitter_and_is_bounded():
    backoff = Backoff()
    delays = [backoff.next() for _ in range(40)]
    assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4
    assert all(5.0 <= delay <= 10.0 for delay in delays[10:])
    assert len(set(delays)) > 30  # drawn, not fixed


# --- the CLI --------------------------------------------------------------------------------------


def printed(*events) -> str:
    out = Out(False, io.StringIO())
    for seq, (event_type, payload) in enumerate(events, start=1):
        out.event({"seq": seq, "type": event_type, "payload": payload})
    return out.stream.getvalue()


def test_the_cli_says_plainly_that_an_event_was_rejected():
    text = printed(
        (
            "backend_status",
            {
                "phase": "event-rejected",
                "eventType": "command_output",
                "bytes": 1_500_000,
                "errorKind": "schema-invalid",
                "status": 413,
                "message": "payload too large",
            },
        )
    )
    assert "event rejected: command_output of 1.5 MB (schema-invalid)" in text
    assert "HTTP 413: payload too large" in text


def test_the_cli_says_plainly_that_output_was_truncated_or_sanitized():
    text = printed(
        (
            "command_output",
            {
                "command": "cat big",
                "output": "head…[1234567 bytes cut]…tail",
                "exitCode": 0,
                "truncatedBytes": 1_234_567,
                "sanitizedPaths": ["/output"],
            },
        ),
        ("assistant_message", {"text": "hi"}),
    )
    lines = text.splitlines()
    assert "(output truncated: 1,234,567 bytes cut)" in lines[2]
    assert "U+FFFD in /output" in lines[3]
    assert lines[4].endswith("assistant: hi") and len(lines) == 5  # nothing said of an untouched event


@pytest.mark.parametrize(("count", "text"), [(900, "900 bytes"), (262_144, "262.1 kB"), (1_500_000, "1.5 MB")])
def test_sizes_are_said_in_decimal_units(count, text):
    assert size_text(count) == text
