"""Delivery decisions without I/O: the plan over a warning's rows, the all-clear's wait, backoff
bounds, the token bucket on a fake clock, webhook signatures."""

from __future__ import annotations

import pytest

from pipeline.domain.delivery import DeliveryRow, RetryPolicy, Step, TokenBucket, plan, sign, unsettled_earlier, verify

CHANNELS = (("webhook", "https://example.org/hook"), ("email", "a@example.org"), ("sms", "+6281234"))


def row(channel: str, address: str, status: str, attempts: int = 1) -> DeliveryRow:
    return DeliveryRow(channel, address, status, attempts)  # type: ignore[arg-type]


def test_a_new_warning_tries_every_channel_in_the_citizens_order() -> None:
    p = plan(CHANNELS, [], max_attempts=3)
    assert p.done is None
    assert p.steps == tuple(Step(c, a, 0, resend=False) for c, a in CHANNELS)


def test_a_delivered_warning_is_skipped_whatever_else_the_rows_say() -> None:
    rows = [row("webhook", "https://example.org/hook", "gave_up", 3), row("email", "a@example.org", "delivered")]
    assert plan(CHANNELS, rows, 3).done == "delivered"
    assert plan(CHANNELS, rows, 3).steps == ()


def test_an_attempt_left_in_flight_is_resent_with_its_count() -> None:
    p = plan(CHANNELS, [row("webhook", "https://example.org/hook", "sending", 2)], 3)
    assert p.steps[0] == Step("webhook", "https://example.org/hook", 2, resend=True)
    assert [s.channel for s in p.steps] == ["webhook", "email", "sms"]


def test_a_given_up_or_exhausted_channel_falls_back_to_the_next() -> None:
    rows = [row("webhook", "https://example.org/hook", "gave_up", 3), row("email", "a@example.org", "failed", 3)]
    assert plan(CHANNELS, rows, 3).steps == (Step("sms", "+6281234", 0, resend=False),)
    failed_once = [row("webhook", "https://example.org/hook", "failed", 1)]
    assert plan(CHANNELS, failed_once, 3).steps[0] == Step("webhook", "https://example.org/hook", 1, resend=False)


def test_every_channel_given_up_or_none_at_all_ends_the_warning() -> None:
    rows = [row(c, a, "gave_up", 3) for c, a in CHANNELS]
    assert plan(CHANNELS, rows, 3).done == "gave_up"
    assert plan((), [], 3).done == "no_channel"


def test_a_channel_listed_twice_is_tried_once() -> None:
    assert len(plan((CHANNELS[0], CHANNELS[0]), [], 3).steps) == 1


def test_an_all_clear_waits_for_warnings_neither_delivered_nor_given_up() -> None:
    rows = {
        "w-delivered": [row("webhook", "h", "gave_up"), row("email", "e", "delivered")],
        "w-gave-up": [row("webhook", "h", "gave_up"), row("email", "e", "gave_up")],
        "w-in-flight": [row("webhook", "h", "sending")],
        "w-retrying": [row("webhook", "h", "gave_up"), row("email", "e", "failed")],
        "all-clear": [row("webhook", "h", "sending")],
    }
    assert unsettled_earlier(rows, "all-clear") == ("w-in-flight", "w-retrying")
    assert unsettled_earlier({}, "all-clear") == ()


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 10, 30])
def test_backoff_stays_between_half_and_all_of_its_ceiling(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=5, initial_s=0.5, maximum_s=20.0)
    ceiling = min(20.0, 0.5 * 2 ** (attempt - 1))
    assert policy.delay(attempt, 0.0) == pytest.approx(ceiling / 2)
    assert ceiling / 2 <= policy.delay(attempt, 0.999999) <= ceiling
    assert policy.delay(attempt, 0.5) > 0


def test_backoff_grows_then_stops_at_the_maximum_and_honours_retry_after_up_to_it() -> None:
    policy = RetryPolicy(max_attempts=5, initial_s=1.0, maximum_s=8.0)
    assert [policy.ceiling(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert policy.delay(1, 0.0, retry_after_s=5.0) == 5.0
    assert policy.delay(1, 0.0, retry_after_s=3600.0) == 8.0
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_lets_a_burst_through_then_makes_the_caller_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, burst=2, clock=clock)
    assert [bucket.reserve() for _ in range(2)] == [0.0, 0.0]
    assert bucket.reserve() == pytest.approx(0.5)
    assert bucket.reserve() == pytest.approx(1.0)  # reserved, never refused: the caller waits its turn
    clock.now += 1.0
    assert bucket.reserve() == pytest.approx(0.5)


def test_token_bucket_refills_up_to_its_burst_only() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, burst=3, clock=clock)
    clock.now += 3600
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() == pytest.approx(1.0)


def test_a_rate_of_zero_is_no_limit() -> None:
    bucket = TokenBucket(0.0, clock=FakeClock())
    assert all(bucket.reserve() == 0.0 for _ in range(10_000))


def test_token_bucket_sustains_its_rate_over_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    for _ in range(1000):
        clock.now += bucket.reserve()
    assert (clock.now - 1000.0) == pytest.approx((1000 - 10) / 10.0)


def test_a_signature_verifies_and_any_change_breaks_it() -> None:
    secret, body = b"s3cret", b'{"warning":{"warning_id":"w1"}}'
    header = sign(secret, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify(secret, header, body, now=1_700_000_010)
    assert not verify(b"other", header, body, now=1_700_000_010)
    assert not verify(secret, header, body + b" ", now=1_700_000_010)
    assert not verify(secret, header.replace("t=1700000000", "t=1700000001"), body, now=1_700_000_010)
    assert not verify(secret, header, body, now=1_700_000_000 + 3600)  # too old: a replayed capture
    assert not verify(secret, "garbage", body, now=1_700_000_000)
