"""Cron: the expression parser against croniter (property-based, across DST zones), explicit
DST examples, invalid expressions, and schedules in a cluster of real processes (on both
stores).

The property test compares instants with croniter 7 after accounting for exactly these
differences, each handled where it arises and commented there:

* sqliteq rules (documented in `CronExpression`): a repeated wall time fires only in its
  first pass unless the hour field is exactly `*` (croniter: both passes); a skipped wall
  time fires once at the jump (croniter: at the jump plus the seconds field, and not at all
  when every hour is chosen -- the latter also differs from Vixie cron, see the report).
* Spelling: croniter reads "a-a" as the whole field and "a/n" in the weekday field up to 6;
  a day field naming every day without `*` is ORed by sqliteq (Vixie), ANDed by croniter.
  The generator spells sqliteq's meaning for croniter.
* croniter bug: it misses the second pass of Lord Howe's 30-minute fall-back.

Everything else must agree instant for instant.
"""

from __future__ import annotations

import calendar
import functools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from coord_workers import Children
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Target, wait_until

import sqliteq
from sqliteq import EnqueueRequest

UTC = timezone.utc

ZONES = ("America/New_York", "Europe/London", "Europe/Berlin", "Australia/Sydney",
         "Australia/Lord_Howe", "America/Sao_Paulo", "Asia/Tokyo", "UTC")
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
          ("month", 1, 12), ("day of week", 0, 7))
LORD_HOWE = "Australia/Lord_Howe"
MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
          "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *"}


# ================================================================ helpers ====

@dataclass(frozen=True)
class Field:
    """One generated field: sqliteq's text, croniter's text, and the values it means."""

    text: str
    croniter_text: str
    values: frozenset[int]

    @property
    def star(self) -> bool:
        return self.text == "*"


@dataclass(frozen=True)
class Spec:
    """A generated expression with an independent model of what it matches."""

    text: str                   # for sqliteq
    croniter_text: str          # the same schedule spelled for croniter
    six: bool                   # leading seconds field
    fields: tuple[Field, ...]   # always 6: second .. day of week (seconds {0} for 5 fields)

    def matches(self, wall: datetime) -> bool:
        """Does this naive wall-clock time match (Vixie day rule: OR when both day fields
        are restricted)?"""
        second, minute, hour, dom, month, dow = self.fields
        if not (wall.second in second.values and wall.minute in minute.values
                and wall.hour in hour.values and wall.month in month.values):
            return False
        in_dom = wall.day in dom.values
        in_dow = (wall.weekday() + 1) % 7 in {d % 7 for d in dow.values}
        if dom.star:
            return in_dow
        if dow.star:
            return in_dom
        return in_dom or in_dow


def star(low: int, high: int) -> Field:
    return Field("*", "*", frozenset(range(low, high + 1)))


@st.composite
def field_items(draw: st.DrawFn, name: str, low: int, high: int) -> Field:
    """One list item: a number, a-b, */n, a-b/n or a/n (names for months and weekdays)."""

    def spell(value: int) -> str:
        if name == "month" and draw(st.booleans()):
            return draw(st.sampled_from((MONTHS[value - 1], MONTHS[value - 1].lower())))
        if name == "day of week" and value < 7 and draw(st.booleans()):
            return WEEKDAYS[value]
        return str(value)

    kind = draw(st.sampled_from(("number", "range", "star_step", "range_step", "start_step")))
    if kind == "number":
        value = draw(st.integers(low, high))
        text = spell(value)
        return Field(text, text, frozenset({value}))
    step = draw(st.integers(1, high - low + 1))
    if kind == "star_step":
        return Field(f"*/{step}", f"*/{step}", frozenset(range(low, high + 1, step)))
    first = draw(st.integers(low, high))
    if kind == "start_step":
        text = f"{spell(first)}/{step}"
        croniter_text = text
        if name == "day of week":
            # sqliteq runs "a/n" up to the field's top, 7 (Sunday again), as "*/n" runs
            # 0-7; croniter stops "a/n" at 6 and reads "7/n" as every day. Spell the same
            # days for croniter explicitly (reported as a doubt, not a bug).
            croniter_text = f"{first}-7/{step}" if first != 7 else "7"
        return Field(text, croniter_text, frozenset(range(first, high + 1, step)))
    last = draw(st.integers(first, high))
    if kind == "range":
        step = 1
    text = f"{spell(first)}-{spell(last)}" + (f"/{step}" if kind == "range_step" else "")
    # croniter 7 reads an equal range "a-a" (and "a-a/n") as the field's whole cycle; for
    # sqliteq and every other cron it is the single value a. Give croniter plain "a".
    croniter_text = text if first != last else spell(first)
    return Field(text, croniter_text, frozenset(range(first, last + 1, step)))


@st.composite
def fields(draw: st.DrawFn, name: str, low: int, high: int) -> Field:
    if draw(st.integers(0, 9)) < 3:
        return star(low, high)
    items = draw(st.lists(field_items(name, low, high), min_size=1, max_size=3))
    return Field(",".join(i.text for i in items), ",".join(i.croniter_text for i in items),
                 frozenset().union(*(i.values for i in items)))


def spec_from_text(text: str) -> Spec:
    """A Spec for a plain-`*`-or-number expression (the macros)."""
    parts = text.split()
    built = [star(lo, hi) if part == "*" else Field(part, part, frozenset({int(part)}))
             for part, (_, lo, hi) in zip(["0", *parts], FIELDS, strict=True)]
    return Spec(text, text, False, tuple(built))


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    if draw(st.integers(0, 19)) == 0:
        macro = draw(st.sampled_from(sorted(MACROS)))
        return Spec(macro, macro, False, spec_from_text(MACROS[macro]).fields)
    six = draw(st.booleans())
    drawn = [draw(fields(*spec)) for spec in (FIELDS if six else FIELDS[1:])]
    if not six:
        drawn.insert(0, Field("0", "0", frozenset({0})))
    dom, dow = drawn[3], drawn[5]
    full_dom = not dom.star and dom.values == frozenset(range(1, 32))
    full_dow = not dow.star and {d % 7 for d in dow.values} == set(range(7))
    if full_dom or full_dow:
        # A day field naming every day without being "*" (1-31, */1, 0-6, ...) is
        # "restricted" for sqliteq, as the text is in Vixie cron: ORed with the other day
        # field, it makes every day match. croniter reads it as "*" and ANDs instead.
        # Spell sqliteq's meaning (every day) for croniter.
        drawn[3] = Field(dom.text, "*", dom.values)
        drawn[5] = Field(dow.text, "*", dow.values)
    shown = drawn if six else drawn[1:]
    return Spec(" ".join(f.text for f in shown), " ".join(f.croniter_text for f in shown),
                six, tuple(drawn))


@functools.cache
def transitions(zone: str, year: int) -> tuple[datetime, ...]:
    """The UTC instants (to the second) in `year` at which `zone`'s UTC offset changes."""
    tz = ZoneInfo(zone)
    found = []
    day = datetime(year, 1, 1, tzinfo=UTC)
    offset = day.astimezone(tz).utcoffset()
    while day.year == year:
        following = day + timedelta(days=1)
        if following.astimezone(tz).utcoffset() != offset:
            low, high = day, following
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if middle.astimezone(tz).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            found.append(high.replace(microsecond=0))
            offset = following.astimezone(tz).utcoffset()
        day = following
    return tuple(found)


@st.composite
def starts(draw: st.DrawFn) -> datetime:
    """An aware start in a random zone, 2000-2040, mostly within hours or days of one of
    the zone's DST transitions (where the interesting cases are)."""
    zone = draw(st.sampled_from(ZONES))
    year = draw(st.integers(2000, 2040))
    near = transitions(zone, year)
    if near and draw(st.integers(0, 9)) < 7:
        around = draw(st.sampled_from(near))
        span = draw(st.sampled_from((2 * 3600, 3 * 86400)))
        moment = around + timedelta(seconds=draw(st.integers(-span, span)))
    else:
        moment = datetime(year, 1, 1, tzinfo=UTC) + timedelta(
            seconds=draw(st.integers(0, 365 * 86400)))
    if draw(st.integers(0, 4)) == 0:
        moment += timedelta(microseconds=draw(st.integers(1, 999_999)))
    return moment.astimezone(ZoneInfo(zone))


def is_second_pass(instant: datetime, tz: ZoneInfo) -> bool:
    """Is this UTC instant the second occurrence of a wall time repeated by a fall-back?"""
    local = instant.astimezone(tz)
    return local.fold == 1 and local.replace(fold=0).astimezone(UTC) != instant


def end_of_second_pass(instant: datetime, tz: ZoneInfo) -> datetime:
    """The first whole second after the repeated period that `instant` is a second pass of
    (offsets change on whole seconds)."""
    low, high = instant, instant + timedelta(hours=3)
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if is_second_pass(middle, tz):
            low = middle
        else:
            high = middle
    return low.replace(microsecond=0) + timedelta(seconds=1)


def spring_forward_at(instant: datetime, tz: ZoneInfo) -> bool:
    """Is this UTC instant the moment of a spring-forward jump (offset grows here)?"""
    before = (instant - timedelta(seconds=1)).astimezone(tz).utcoffset()
    return instant.astimezone(tz).utcoffset() > before  # type: ignore[operator]


def last_spring_forward(instant: datetime, zone: str) -> datetime | None:
    tz = ZoneInfo(zone)
    candidates = [t for year in (instant.year - 1, instant.year)
                  for t in transitions(zone, year) if t <= instant and spring_forward_at(t, tz)]
    return max(candidates, default=None)


def sqliteq_fires(spec: Spec, zone: str, start: datetime, count: int) -> list[datetime]:
    """The next `count` fire instants from sqliteq, feeding each result back, in UTC."""
    tz = ZoneInfo(zone)
    expression = sqliteq.CronExpression(spec.text, zone)
    hour_is_all = spec.fields[2].values == frozenset(range(24))
    fired: list[datetime] = []
    moment = start
    for _ in range(count * 3):
        following = expression.next_after(moment)
        if following is None:
            break
        assert following.astimezone(UTC) > moment.astimezone(UTC)    # not wall times
        assert following.tzinfo is not None
        assert following.microsecond == 0
        moment = following
        instant = following.astimezone(UTC)
        # Documented sqliteq rule: a wall time skipped by spring-forward fires once at the
        # jump -- also when the hour field is all hours. croniter (and Vixie cron, for
        # "wildcard" jobs) does not compensate a skipped time when every hour is chosen:
        # every real hour still has its match. Drop those compensation fires (where the
        # jump moment's own wall time does not match) so the rest can be compared.
        if hour_is_all and spring_forward_at(instant, tz) and not spec.matches(
                instant.astimezone(tz).replace(tzinfo=None)):
            continue
        # croniter bug: on Lord Howe's 30-minute fall-back it skips the second pass of the
        # repeated half hour (unless it starts inside it). Compare Lord Howe without
        # second passes on either side; test_lord_howe_half_hour_fall_back pins sqliteq.
        if zone == LORD_HOWE and is_second_pass(instant, tz):
            moment = (end_of_second_pass(instant, tz) - timedelta(seconds=1)).astimezone(tz)
            continue
        fired.append(instant)
        if len(fired) == count:
            break
    return fired


def croniter_fires(spec: Spec, zone: str, start: datetime, count: int) -> list[datetime]:
    """The next `count` fire instants from croniter, in UTC, with the documented
    differences applied."""
    tz = ZoneInfo(zone)
    options: dict[str, Any] = {"day_or": True}
    if spec.six:
        options["second_at_beginning"] = True
    iterator = croniter(spec.croniter_text, start, **options)
    hour_star = spec.text.startswith("@hourly") or (
        not spec.text.startswith("@") and spec.text.split()[2 if spec.six else 1] == "*")
    fired: list[datetime] = []
    for _ in range(count * 20):
        instant = iterator.get_next(datetime).astimezone(UTC)
        if fired and instant <= fired[-1]:
            continue
        if is_second_pass(instant, tz) and (not hour_star or zone == LORD_HOWE):
            # Documented sqliteq rule: a repeated wall time fires once (its first pass)
            # unless the hour field is exactly "*"; croniter fires both passes. Skip the
            # rest of the repeated period at once (a seconds schedule has thousands).
            # (Lord Howe: see sqliteq_fires.)
            end = end_of_second_pass(instant, tz)
            iterator = croniter(spec.croniter_text,
                                (end - timedelta(seconds=1)).astimezone(tz), **options)
            continue
        jump = last_spring_forward(instant, zone)
        if (jump is not None and instant - jump < timedelta(minutes=1)
                and not spec.matches(instant.astimezone(tz).replace(tzinfo=None))):
            # croniter fires a time skipped by spring-forward once, like sqliteq, but at
            # the jump plus the expression's seconds (e.g. 03:00:37 for 02:xx:37), and not
            # at all when it coincides with a real fire (02:30:01 on Lord Howe for
            # "1 * 2 * * *"). Drop its compensation here; it is re-added at the jump below.
            continue
        fired.append(instant)
        if len(fired) == count + 3:
            break
    # Documented sqliteq rule: a skipped wall time fires once, at the moment of the jump
    # (where the hour field is all hours sqliteq_fires leaves these out, as croniter does).
    if spec.fields[2].values != frozenset(range(24)):
        for year in range(start.year, (fired[-1] if fired else start).year + 1):
            for jump in transitions(zone, year):
                if (start.astimezone(UTC) < jump <= (fired[-1] if fired else jump)
                        and spring_forward_at(jump, tz) and gap_matches(spec, jump, tz)):
                    fired.append(jump)
    return sorted(set(fired))[:count]


def gap_matches(spec: Spec, jump: datetime, tz: ZoneInfo) -> bool:
    """Does any wall time skipped by the spring-forward at `jump` match the expression?"""
    wall = (jump - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
    end = jump.astimezone(tz).replace(tzinfo=None)
    while True:
        wall += timedelta(seconds=1)
        if wall >= end:
            return False
        if spec.matches(wall):
            return True


# ===================================================== parser vs croniter ====

# 800 inputs by default (about 10 s); the soak of README "Development" tries 10,000.
@settings(max_examples=10_000 if os.environ.get("SQLITEQ_SOAK") else 800, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), start=starts())
def test_next_fire_times_agree_with_croniter(spec: Spec, start: datetime) -> None:
    zone = str(start.tzinfo)
    dom, month, dow = spec.fields[3], spec.fields[4], spec.fields[5]
    try:
        sqliteq.CronExpression(spec.text, zone)
    except sqliteq.InvalidInput as exc:
        # Only a schedule that can never fire may be rejected.
        assert "never fires" in str(exc)
        assert dow.star
        assert not any(day <= calendar.monthrange(2000, m)[1]
                       for m in month.values for day in dom.values)
        return
    ours = sqliteq_fires(spec, zone, start, 5)
    theirs = croniter_fires(spec, zone, start, 5)
    assert len(ours) == 5
    assert [t.isoformat() for t in ours] == [t.isoformat() for t in theirs], (
        spec.text, zone, start.isoformat())


def test_every_valid_field_form_parses() -> None:
    """Spot checks of the field forms the property test generates, against hand values."""
    expression = sqliteq.CronExpression("5/20 */6 1-10/3,31 jan-mar,DEC mon-FRI,7")
    assert expression.minutes == (5, 25, 45)
    assert expression.hours == (0, 6, 12, 18)
    assert expression.days == (1, 4, 7, 10, 31)
    assert expression.months == (1, 2, 3, 12)
    assert expression.weekdays == frozenset({0, 1, 2, 3, 4, 5})
    assert sqliteq.CronExpression("@hourly").minutes == (0,)


# ========================================================== DST examples ====

NEW_YORK = "America/New_York"


def fires(expression: str, tz: str, start: datetime, count: int) -> list[datetime]:
    parsed = sqliteq.CronExpression(expression, tz)
    out = []
    for _ in range(count):
        start = parsed.next_after(start)
        out.append(start)
    return out


def test_skipped_time_fires_once_at_the_jump() -> None:
    """2026-03-08, New York: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist."""
    ny = ZoneInfo(NEW_YORK)
    got = fires("30 2 * * *", NEW_YORK, datetime(2026, 3, 7, 12, tzinfo=ny), 3)
    assert [t.astimezone(UTC) for t in got] == [
        datetime(2026, 3, 8, 7, 0, tzinfo=UTC),        # 03:00 EDT, the jump
        datetime(2026, 3, 9, 6, 30, tzinfo=UTC),       # 02:30 EDT
        datetime(2026, 3, 10, 6, 30, tzinfo=UTC)]
    assert got[0].astimezone(ny).strftime("%H:%M %Z") == "03:00 EDT"


def test_every_hour_schedule_goes_on_in_the_next_real_hour_across_the_jump() -> None:
    """An hour field of `*` has nothing to catch up: 02:30 EST does not exist, so the
    schedule fires at 01:30 EST, then 03:30 EDT (not also at the 03:00 jump)."""
    ny = ZoneInfo(NEW_YORK)
    got = fires("30 * * * *", NEW_YORK, datetime(2026, 3, 8, 0, 45, tzinfo=ny), 3)
    assert [t.astimezone(ny).strftime("%H:%M %Z") for t in got] == [
        "01:30 EST", "03:30 EDT", "04:30 EDT"]


def test_repeated_time_fires_once_on_fall_back() -> None:
    """2026-11-01, New York: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice."""
    ny = ZoneInfo(NEW_YORK)
    got = fires("30 1 * * *", NEW_YORK, datetime(2026, 10, 31, 12, tzinfo=ny), 3)
    assert [t.astimezone(UTC) for t in got] == [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),      # 01:30 EDT (first pass only)
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
        datetime(2026, 11, 3, 6, 30, tzinfo=UTC)]
    # Also from inside the repeated hour: the second pass is not a fire.
    inside = datetime(2026, 11, 1, 5, 45, tzinfo=UTC)   # 01:45 EDT
    assert fires("30 1 * * *", NEW_YORK, inside, 1)[0].astimezone(UTC) == datetime(
        2026, 11, 2, 6, 30, tzinfo=UTC)


def test_every_hour_fires_in_both_passes_of_the_repeated_hour() -> None:
    ny = ZoneInfo(NEW_YORK)
    got = fires("0 * * * *", NEW_YORK, datetime(2026, 11, 1, 0, 30, tzinfo=ny), 4)
    assert [t.astimezone(ny).strftime("%H:%M %Z") for t in got] == [
        "01:00 EDT", "01:00 EST", "02:00 EST", "03:00 EST"]
    assert [t.astimezone(UTC).hour for t in got] == [5, 6, 7, 8]


def test_lord_howe_half_hour_fall_back() -> None:
    """Lord Howe falls back 30 minutes (02:00 +11 -> 01:30 +10:30). With hour `*` both
    passes of 01:30-01:59 fire (croniter 7 misses the second pass: a croniter bug); with a
    fixed hour only the first."""
    zone = "Australia/Lord_Howe"
    start = datetime(2026, 4, 5, 1, 0, tzinfo=ZoneInfo(zone))     # +11, before the change
    every_hour = fires("40 * * * *", zone, start, 3)
    assert [t.isoformat() for t in every_hour] == [
        "2026-04-05T01:40:00+11:00", "2026-04-05T01:40:00+10:30", "2026-04-05T02:40:00+10:30"]
    fixed = fires("40 1 * * *", zone, start, 2)
    assert [t.isoformat() for t in fixed] == [
        "2026-04-05T01:40:00+11:00", "2026-04-06T01:40:00+10:30"]


def test_sao_paulo_midnight_gap() -> None:
    """São Paulo jumped from 00:00 to 01:00 (2018-11-04): midnight fires at 01:00."""
    zone = "America/Sao_Paulo"
    got = fires("0 0 * * *", zone, datetime(2018, 11, 3, 12, tzinfo=ZoneInfo(zone)), 2)
    assert [t.isoformat() for t in got] == ["2018-11-04T01:00:00-02:00",
                                            "2018-11-05T00:00:00-02:00"]


# ===================================================== invalid expressions ====

@pytest.mark.parametrize(("expression", "named"), [
    ("61 * * * *", "minute field"),
    ("* 24 * * *", "hour field"),
    ("* * 0 * *", "day of month field"),
    ("* * 32 * *", "day of month field"),
    ("* * * 13 *", "month field"),
    ("* * * 0 *", "month field"),
    ("* * * * 8", "day of week field"),
    ("60 * * * * *", "second field"),
    ("*/0 * * * *", "minute field"),
    ("5-1 * * * *", "minute field"),
    ("* * * FOO *", "month field"),
    ("* * * * MON-FOO", "day of week field"),
    ("1,,2 * * * *", "minute field"),
    ("-1 * * * *", "minute field"),
    ("*/x * * * *", "minute field"),
    ("*/ * * * *", "minute field"),
    ("* 5/ * * *", "hour field"),
    ("² * * * *", "minute field"),
    ("* * * */² *", "month field"),
    ("٣ * * * *", "minute field"),
])
def test_invalid_field_names_the_field(expression: str, named: str) -> None:
    with pytest.raises(sqliteq.InvalidInput) as caught:
        sqliteq.CronExpression(expression)
    message = str(caught.value)
    assert named in message
    if named == "month field":
        assert "day of month" not in message


@pytest.mark.parametrize(("expression", "says"), [
    ("a b c", "3 fields"),
    ("* * * *", "4 fields"),
    ("* * * * * * *", "7 fields"),
    ("", "0 fields"),
    ("@every_minute", "1 fields"),
    ("0 0 30 2 *", "never fires"),
    ("0 0 31 4,6,9,11 *", "never fires"),
])
def test_invalid_shape_is_rejected(expression: str, says: str) -> None:
    with pytest.raises(sqliteq.InvalidInput, match=says):
        sqliteq.CronExpression(expression)


def test_unknown_time_zone_is_rejected() -> None:
    with pytest.raises(sqliteq.InvalidInput, match="time zone"):
        sqliteq.CronExpression("* * * * *", "Mars/Olympus_Mons")
    with pytest.raises(sqliteq.InvalidInput, match="time zone"):
        sqliteq.CronExpression("* * * * *", "../../etc/passwd")


def test_runtime_cron_rejects_at_declaration(target: Target) -> None:
    with target.open() as storage:
        rt = sqliteq.Runtime(storage, {"default": 1})
        for expression, tz in (("61 * * * *", None), ("* * * *", None),
                               ("0 0 30 2 *", None), ("* * * * *", "Nowhere/Land")):
            with pytest.raises(sqliteq.InvalidInput):
                rt.cron("bad", expression, EnqueueRequest("tick"), tz=tz)
        with pytest.raises(sqliteq.InvalidInput):
            rt.cron("bad", "* * * * *", "not a request")  # type: ignore[arg-type]
        rt.start()
        try:
            assert storage.cron.list() == []
        finally:
            rt.stop()


# ============================================================ storage.cron ====

def test_cron_list_shows_schedule_and_redeclare_rules(target: Target) -> None:
    with target.open() as storage:
        request = EnqueueRequest("report", {"x": 1}, queue_name="reports")
        before = datetime.now(UTC)
        storage.cron.declare("nightly", sqliteq.CronExpression("15 3 * * *", "Asia/Tokyo"),
                             request)
        [schedule] = storage.cron.list()
        assert schedule.name == "nightly"
        assert schedule.expression == "15 3 * * *"
        assert schedule.timezone == "Asia/Tokyo"
        assert schedule.enabled is True
        assert schedule.last_error is None
        assert schedule.request.kind == "report"
        assert schedule.request.payload == {"x": 1}
        assert schedule.request.queue_name == "reports"
        fire = schedule.next_fire_at
        assert fire is not None and fire.tzinfo is not None
        assert before < fire <= before + timedelta(days=1)
        local = fire.astimezone(ZoneInfo("Asia/Tokyo"))
        assert (local.hour, local.minute, local.second) == (3, 15, 0)

        # Re-declaring unchanged keeps the stored next tick, whatever it is: move it to a
        # recognisable value behind sqliteq's back first.
        marker = int((before + timedelta(hours=5)).timestamp()) * 1000
        target.sql("UPDATE cron SET next_fire_at = ? WHERE name = 'nightly'", marker)
        storage.cron.declare("nightly", sqliteq.CronExpression("15 3 * * *", "Asia/Tokyo"),
                             request)
        [schedule] = storage.cron.list()
        assert int(schedule.next_fire_at.timestamp() * 1000) == marker

        # Another expression: recomputed from now.
        storage.cron.declare("nightly", sqliteq.CronExpression("45 4 * * *", "Asia/Tokyo"),
                             request)
        [schedule] = storage.cron.list()
        assert schedule.expression == "45 4 * * *"
        assert int(schedule.next_fire_at.timestamp() * 1000) != marker
        local = schedule.next_fire_at.astimezone(ZoneInfo("Asia/Tokyo"))
        assert (local.hour, local.minute) == (4, 45)
        assert datetime.now(UTC) < schedule.next_fire_at

        # Another time zone or another request also count as a change.
        target.sql("UPDATE cron SET next_fire_at = ? WHERE name = 'nightly'", marker)
        storage.cron.declare("nightly", sqliteq.CronExpression("45 4 * * *", "UTC"), request)
        [schedule] = storage.cron.list()
        assert schedule.timezone == "UTC"
        assert schedule.next_fire_at.astimezone(UTC).hour == 4
        target.sql("UPDATE cron SET next_fire_at = ? WHERE name = 'nightly'", marker)
        storage.cron.declare("nightly", sqliteq.CronExpression("45 4 * * *", "UTC"),
                             EnqueueRequest("report", {"x": 2}, queue_name="reports"))
        [schedule] = storage.cron.list()
        assert int(schedule.next_fire_at.timestamp() * 1000) != marker
        assert schedule.request.payload == {"x": 2}


def test_time_zone_of_a_schedule(target: Target) -> None:
    with target.open() as storage:
        rt = sqliteq.Runtime(storage, {"default": 1})
        rt.cron("paris", "0 9 * * *", EnqueueRequest("morning"), tz="Europe/Paris")
        before = datetime.now(UTC)
        rt.start()
        after = datetime.now(UTC)
        try:
            [schedule] = storage.cron.list()
        finally:
            rt.stop()
        assert schedule.timezone == "Europe/Paris"
        paris = schedule.next_fire_at.astimezone(ZoneInfo("Europe/Paris"))
        assert (paris.hour, paris.minute, paris.second) == (9, 0, 0)
        # The first 09:00 in Paris after now (computed independently, for the instants just
        # before and after the declaration, in case 09:00 passed in between).
        assert schedule.next_fire_at in {first_nine_in_paris(before), first_nine_in_paris(after)}


def first_nine_in_paris(moment: datetime) -> datetime:
    paris = ZoneInfo("Europe/Paris")
    local = moment.astimezone(paris)
    candidate = local.replace(hour=9, minute=0, second=0, microsecond=0)
    if candidate <= local:
        candidate = (local + timedelta(days=1)).replace(hour=9, minute=0, second=0,
                                                        microsecond=0)
    return candidate.astimezone(UTC)


# ================================================== schedules in a cluster ====

@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path / "logs")
    try:
        yield kids
    finally:
        kids.close()


def tick_run_ats(storage: sqliteq.Storage) -> list[int]:
    """The ticks enqueued: each tick job's run_at is its tick, even when a stopping runtime
    had claimed it and handed it back before it ran."""
    rows = storage.db.read("SELECT run_at FROM jobs WHERE kind = 'tick' ORDER BY run_at")
    return [row[0] for row in rows]


def test_cron_in_a_cluster_fires_each_tick_once(target: Target, children: Children) -> None:
    target.open().close()
    procs = [children.start("cron", *target.options(), "--schedule", "* * * * * *")
             for _ in range(3)]
    with target.open() as storage:
        def all_up() -> bool:
            children.check_alive()
            return {p.pid for p in procs} <= {info.pid for info in storage.processes.list()}

        wait_until(all_up, 30, "all three runtimes to register")
        # A process registers before it declares its schedules: wait for a first tick, so
        # the schedule surely exists before the window opens.
        wait_until(lambda: tick_run_ats(storage), 10, "the first tick")
        window_start = time.time()
        time.sleep(5)           # the observation window itself, not a wait for a result
        window_end = time.time()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0, children.stderr(proc)

        run_ats = tick_run_ats(storage)
        assert len(run_ats) == len(set(run_ats)), "a tick was enqueued more than once"
        assert all(run_at % 1000 == 0 for run_at in run_ats), "run_at is not the tick"
        # Every whole second strictly inside the window where all three were up.
        first = int(window_start) + 1
        last = int(window_end) - 1
        expected = set(range(first * 1000, last * 1000 + 1, 1000))
        assert len(expected) >= 3
        missing = sorted(expected - set(run_ats))
        assert not missing, f"ticks missed: {missing}"
        # The ticks were really shared: each tick's job exists once (above); and the jobs
        # ran (the children register a handler for "tick").
        counts = storage.jobs.counts()
        assert counts["failed"] == 0


def ticking_runtime(storage: sqliteq.Storage) -> sqliteq.Runtime:
    """A runtime declaring the schedule "every-second" of "tick" jobs, and running them."""
    rt = sqliteq.Runtime(storage, {"default": 1}, poll_interval=0.02)
    rt.register("tick", lambda ctx, payload: None)
    rt.cron("every-second", "* * * * * *", EnqueueRequest("tick"))
    return rt


def test_no_catch_up_storm_after_downtime(target: Target) -> None:
    with target.open() as storage:
        first = ticking_runtime(storage)
        first.start()
        try:
            wait_until(lambda: len(tick_run_ats(storage)) >= 1, 10, "a first tick")
        finally:
            first.stop()
        before = set(tick_run_ats(storage))

        # Downtime, cheaply: instead of sleeping past MISSED_AFTER_MS (5 s), move the
        # stored next tick 60 s into the past, as if every runtime had been down a minute.
        stale = (int(time.time()) - 60) * 1000
        target.sql("UPDATE cron SET next_fire_at = ? WHERE name = 'every-second'", stale)

        second = ticking_runtime(storage)      # the schedule unchanged
        restarted = time.time()
        second.start()
        try:
            wait_until(lambda: len(set(tick_run_ats(storage)) - before) >= 3, 15,
                       "ticks to continue after the catch-up run")
        finally:
            second.stop()
        stopped = time.time()

        new = sorted(set(tick_run_ats(storage)) - before)
        catch_up, regular = new[0], new[1:]
        # One job for the whole missed minute, run_at = when it fired (not the stale tick).
        # Nothing was enqueued for the 60 missed ticks themselves (run_at in the window).
        assert restarted * 1000 - 5 <= catch_up <= restarted * 1000 + 3000, "missed ticks"
        # Then one per second on whole seconds, none skipped.
        assert all(t % 1000 == 0 for t in regular)
        assert regular == list(range(regular[0], regular[-1] + 1, 1000))
        assert regular[0] - catch_up <= 1000
        assert len(new) <= (stopped - restarted) + 2


def test_a_disabled_schedule_stops_firing_and_enabled_again_skips_what_it_missed(
        target: Target) -> None:
    def ticks() -> dict[str, int]:      # every tick job, whatever its state: id -> run_at
        return dict(storage.db.read("SELECT id, run_at FROM jobs WHERE kind = 'tick'"))

    with target.open() as storage:
        rt = ticking_runtime(storage)
        rt.start()
        try:
            wait_until(lambda: len(ticks()) >= 1, 10, "a first tick")
            assert storage.cron.disable("every-second")
            fired = ticks()
            # Due a minute ago, and declared again unchanged: still it stays disabled.
            target.sql("UPDATE cron SET next_fire_at = ? WHERE name = 'every-second'",
                       (int(time.time()) - 60) * 1000)
            storage.cron.declare("every-second", sqliteq.CronExpression("* * * * * *"),
                                 EnqueueRequest("tick"))
            time.sleep(1.5)                     # (75 polls of the scheduler)
            assert ticks() == fired
            assert [s.enabled for s in storage.cron.list()] == [False]
            enabled_at = time.time()
            assert storage.cron.enable("every-second")
            (schedule,) = storage.cron.list()
            assert schedule.enabled and schedule.next_fire_at is not None
            assert schedule.next_fire_at.timestamp() > enabled_at
            wait_until(lambda: len(ticks()) > len(fired), 10, "the next tick")
            # (Read before the stop, which hands back a claimed tick with a new run_at.)
            new = [run_at for job_id, run_at in ticks().items() if job_id not in fired]
        finally:
            rt.stop()
        # No catch-up run for the missed minute: every new job is a whole-second tick.
        assert all(run_at % 1000 == 0 for run_at in new)
        assert storage.cron.remove("every-second")
        assert storage.cron.list() == []
        assert not (storage.cron.remove("every-second") or storage.cron.disable("every-second")
                    or storage.cron.enable("every-second"))


def test_a_schedule_declared_elsewhere_does_not_make_the_scheduler_spin(target: Target
                                                                         ) -> None:
    """A runtime sleeps until the next tick of ITS schedules: a due schedule it does not
    declare (an older deploy's, or another kind of worker's that is down) is not its to
    fire and must not make its scheduler busy-spin."""
    with target.open() as storage:
        # A schedule of another (currently stopped) kind of worker, due a minute ago.
        storage.cron.declare("elsewhere", sqliteq.CronExpression("* * * * *"),
                             EnqueueRequest("other"))
        target.sql("UPDATE cron SET next_fire_at = ?", sqliteq.now_ms() - 60_000)
        rt = sqliteq.Runtime(storage, {"default": 1})
        rt.cron("mine", "0 0 1 1 *", EnqueueRequest("yearly"))
        with rt:
            wait_until(lambda: len(storage.cron.list()) == 2, 10, "the declaration")
            cpu, wall = time.process_time(), time.monotonic()
            time.sleep(1.0)         # measuring an idle second, not waiting for a result
            used = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert storage.jobs.counts()["queued"] == 0     # not ours to fire
        assert used < 0.3, f"idle runtime used {used:.0%} of a CPU"


class PickyRouter:
    """Routes "good" to the default queue; "empty" to an invalid queue name; raises for
    "bad" (a custom router that has no route for a kind)."""

    def route(self, kind: str) -> str:
        if kind == "bad":
            raise LookupError(f"no route for {kind!r}")
        return "" if kind == "empty" else "default"


def good_jobs(storage: sqliteq.Storage) -> int:
    return len(storage.jobs.list(kind="good"))


def test_a_schedule_that_cannot_enqueue_records_its_error(target: Target) -> None:
    with target.open() as storage:
        rt = sqliteq.Runtime(storage, {"default": 1}, router=PickyRouter())
        rt.register("good", lambda ctx, payload: None)
        rt.cron("a-empty", "* * * * * *", EnqueueRequest("empty"))
        rt.cron("b-good", "* * * * * *", EnqueueRequest("good"))
        started = time.time()
        with rt:
            wait_until(lambda: good_jobs(storage) >= 2, 10, "the good schedule to fire")
            errors = wait_until(lambda: [s.last_error for s in storage.cron.list()
                                         if s.name == "a-empty" and s.last_error], 10,
                                "the failing schedule to record its error")
        assert "InvalidInput" in errors[0] and "'empty'" in errors[0]
        assert storage.jobs.list(kind="empty") == []
        [failing] = [s for s in storage.cron.list() if s.name == "a-empty"]
        assert failing.next_fire_at.timestamp() > started + 1     # its ticks still advance


def test_a_router_error_in_one_schedule_does_not_stop_the_others(target: Target) -> None:
    with target.open() as storage:
        rt = sqliteq.Runtime(storage, {"default": 1}, router=PickyRouter())
        rt.register("good", lambda ctx, payload: None)
        rt.cron("a-bad", "* * * * * *", EnqueueRequest("bad"))
        rt.cron("b-good", "* * * * * *", EnqueueRequest("good"))
        with rt:
            wait_until(lambda: good_jobs(storage) >= 2, 10, "the good schedule to fire")
            errors = wait_until(lambda: [s.last_error for s in storage.cron.list()
                                         if s.name == "a-bad" and s.last_error], 10,
                                "the failing schedule to record its error")
        assert "no route for 'bad'" in errors[0]
