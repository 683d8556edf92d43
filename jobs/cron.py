"""Five-field cron schedules (minute hour day-of-month month day-of-week), as a Kubernetes
CronJob and KubeRay's RayCronJob read them: each field `*`, a number, a range, a list, or a
step (`*/15`, `1-5/2`), with month and weekday names (`jan`, `mon-fri`)."""

from __future__ import annotations

MONTHS = {name: number for number, name in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
WEEKDAYS = {name: number for number, name in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lowest, highest, names) of each field; 7 is Sunday too.
FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, WEEKDAYS),
)


def parse_cron(expression: str) -> list[set[int]]:
    """The values each field of `expression` takes (day of week: 0-6, Sunday 0), or
    ValueError saying which field is wrong."""
    fields = expression.split()
    if len(fields) != len(FIELDS):
        raise ValueError(f"{expression!r} is not a 5-field cron expression (minute hour day month weekday), e.g. '0 3 * * *'")
    parsed = [_field(text, *field) for text, field in zip(fields, FIELDS)]
    parsed[4] = {day % 7 for day in parsed[4]}
    return parsed


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        body, slash, step = part.partition("/")
        try:
            if body == "*":
                start, end = low, high
            else:
                first, dash, last = body.partition("-")
                start = names[first] if first in names else int(first)
                end = (names[last] if last in names else int(last)) if dash else (high if slash else start)
            stride = int(step) if slash else 1
        except ValueError:
            raise ValueError(f"{name} {part!r} is not a number, name, range, list or step") from None
        if not (low <= start <= end <= high) or stride < 1:
            raise ValueError(f"{name} {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, stride))
    return values
