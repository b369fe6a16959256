"""JSON in and out: orjson for speed, with the standard library reading what orjson refuses."""

from __future__ import annotations

import json

import pytest

from cds_service.jsonio import dumps, loads

from .conftest import FIXTURES, SERVICE_URL, hook_body, load


def test_a_chart_with_an_integer_beyond_64_bits_is_answered(client):
    body = hook_body(load(FIXTURES / "01-lung-high-risk-all-four.json"))
    raw = json.dumps(body).replace(
        '"resourceType": "Patient"', '"extra": 123456789012345678901234567890, "resourceType": "Patient"', 1
    )
    assert "1234567890123456789012345" in raw
    resp = client.post(SERVICE_URL, data=raw, content_type="application/json")
    assert resp.status_code == 200 and len(resp.get_json()["cards"]) == 1


def test_a_utf16_body_is_read_like_the_standard_library_reads_it(client):
    body = hook_body(load(FIXTURES / "16-out-peritoneal-only.json"))
    resp = client.post(SERVICE_URL, data=json.dumps(body).encode("utf-16"), content_type="application/json")
    assert resp.status_code == 200 and resp.get_json() == {"cards": []}


@pytest.mark.parametrize("raw", [b'{"a": 1', b"{'a': 1}", b"\xff\xfe\x00garbage", b"[1, 2,]"])
def test_malformed_json_raises_the_standard_error(raw):
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        loads(raw)


def test_dumps_is_compact_utf8_and_writes_what_orjson_cannot():
    assert dumps({"text": "café – ≥ 5 ng/mL", "n": [1, 2.5]}) == '{"text":"café – ≥ 5 ng/mL","n":[1,2.5]}'
    assert dumps({"big": 2**70}) == '{"big":1180591620717411303424}'
    assert loads(dumps({"big": 2**70})) == {"big": 2**70}
