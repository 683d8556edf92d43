"""When each stage of a Ray Data execution produced rows, seen from the driver's executor.

Registered through Ray Data's RAY_DATA_EXECUTION_CALLBACKS variable in the driver only (a
callback in the DataContext would travel to every task with it), so this module stays light.
Uses the executor's private topology and operator metrics (ray 2.60).
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback


class StageClock(ExecutionCallback):
    """Per operator: perf_counter time of its first and last output rows, the rows so far, in
    how many steps they came and each step's (time, rows so far) (`stages`); each time the
    operator named like `watched` has produced more rows, calls `on_rows(total rows so far)`.
    Configure with `watch` before the execution starts."""

    stages: dict[str, dict] = {}
    watched = ""
    on_rows = staticmethod(lambda rows: None)

    @classmethod
    def watch(cls, operator: str, on_rows) -> None:
        cls.stages, cls.watched, cls.on_rows = {}, operator, staticmethod(on_rows)

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        cls = type(self)
        for operator in executor._topology:
            rows = operator.metrics.rows_task_outputs_generated
            stage = cls.stages.get(operator.name)
            if not rows or (stage is not None and rows == stage["rows"]):
                continue
            if stage is None:
                cls.stages[operator.name] = {"first_output": now, "last_output": now, "rows": rows, "steps": 1, "timeline": [(now, rows)]}
            else:
                stage.update(last_output=now, rows=rows, steps=stage["steps"] + 1)
                stage["timeline"].append((now, rows))
            if cls.watched in operator.name:
                cls.on_rows(rows)
