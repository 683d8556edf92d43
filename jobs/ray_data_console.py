"""Ray Data's console as rayseg runs it without -v: warnings and errors, less the warning
that its progress bars are off (rayseg turns them off, for its own). Ray Data's log file
(`ray-data.log` in the session's logs) keeps everything.

The driver's Ray Data is set so in `jobs/cluster.py`; the Ray processes of a local Ray that
rayseg starts read LOGGING_CONFIG through Ray Data's own setting, RAY_DATA_LOGGING_CONFIG,
and import this module for its filter: so it imports nothing but `logging`.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Ray Data's default logging config with the console at WARNING and NotProgressOff.
LOGGING_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
LOGGING_CONFIG_ENV = "RAY_DATA_LOGGING_CONFIG"
PROGRESS_OFF = "Progress bars disabled"


class NotProgressOff(logging.Filter):
    """Drops Ray Data's 'Progress bars disabled. To enable, …' warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(PROGRESS_OFF)
