"""``FieldList`` and ``ProxyResponse``: an upstream's fields stay as received until something reads them."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.chain import FieldList, ProxyResponse

RAW = [(b"Set-Cookie", b"a=1"), (b"X-Name", b"caf\xe9 \xff"), (b"set-cookie", b"b=2")]


def test_fields_stay_untouched_until_decoded_and_decoding_keeps_every_byte() -> None:
    fields = FieldList(list(RAW))
    assert fields.untouched() == RAW
    decoded = fields.decoded()
    assert fields.untouched() is None
    assert decoded.getall("set-cookie") == ["a=1", "b=2"]
    assert decoded["x-name"].encode("utf-8", "surrogateescape") == b"caf\xe9 \xff"
    assert fields.decoded() is decoded  # decoded once: later changes to the mapping are the truth


def test_a_response_reading_its_headers_gives_up_the_fields_as_received() -> None:
    response = ProxyResponse(200, fields=FieldList(list(RAW)))
    assert response.untouched_fields() == RAW
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.untouched_fields() is None


def test_replacing_the_headers_wins_over_the_fields() -> None:
    response = ProxyResponse(200, fields=FieldList(list(RAW)))
    response.headers = CIMultiDict({"X-Only": "1"})
    assert response.untouched_fields() is None and dict(response.headers) == {"X-Only": "1"}


def test_a_policy_made_response_has_no_fields_and_empty_headers_by_default() -> None:
    assert ProxyResponse(503).untouched_fields() is None
    assert len(ProxyResponse(503).headers) == 0
    made = ProxyResponse(200, CIMultiDict({"A": "1"}))
    assert made.untouched_fields() is None and made.headers["a"] == "1"
