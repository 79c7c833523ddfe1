"""Reading how long a provider asks to wait: ``retry-after-ms``, and ``Retry-After`` as seconds or as an HTTP date."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from workers.providers.base import HttpResponse, retry_after_seconds, text_failure

NOW = datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC)


@pytest.mark.parametrize("headers, seconds", [
    ({"Retry-After": "20"}, 20.0),
    ({"retry-after": "0"}, 0.0),
    ({"Retry-After": " 7 "}, 7.0),
    ({"Retry-After": "1.5"}, 1.5),
    ({"Retry-After": "-3"}, 0.0),
    # RFC 9110's preferred IMF-fixdate, and the two obsolete forms a recipient must also read
    ({"Retry-After": "Wed, 21 Oct 2026 07:28:30 GMT"}, 30.0),
    ({"Retry-After": "Wednesday, 21-Oct-26 07:29:00 GMT"}, 60.0),
    ({"Retry-After": "Wed Oct 21 07:28:05 2026"}, 5.0),
    ({"Retry-After": "Wed, 21 Oct 2026 07:27:00 GMT"}, 0.0),  # in the past
    ({"Retry-After": "Tue, 20 Oct 2026 07:28:00 GMT"}, 0.0),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),  # milliseconds preferred: the more precise
    ({"Retry-After-Ms": "250", "Retry-After": "Wed, 21 Oct 2026 07:29:00 GMT"}, 0.25),
    ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),  # unreadable ms: the other header
    ({"retry-after-ms": "-5"}, 0.0),
    ({}, None),
    ({"Retry-After": ""}, None),
    ({"Retry-After": "soon"}, None),
    ({"Retry-After": "nan"}, None),
    ({"Retry-After": "inf"}, None),
    ({"Retry-After": "Wed, 99 Oct 2026 07:28:30 GMT"}, None),
])
def test_retry_after_forms(headers: dict, seconds: float | None) -> None:
    assert retry_after_seconds(headers, now=NOW) == seconds


def test_an_http_date_is_measured_from_now_by_default() -> None:
    assert retry_after_seconds({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0.0
    ahead = retry_after_seconds({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})
    assert ahead is not None and ahead > 2e11  # some 7,970 years


def test_the_clients_headers_are_read_whatever_their_case() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"RETRY-AFTER-MS": "100", "Retry-After": "3"}))  # as aiohttp gives them
    assert retry_after_seconds(headers) == 0.1
    dated = CIMultiDictProxy(CIMultiDict({"retry-after": "Wed, 21 Oct 2026 07:28:30 GMT"}))
    assert text_failure(HttpResponse(429, dated, b"slow"),
                        ).retry_after_seconds is not None
