"""Imported by every Ray worker of the benchmark's local Ray when it starts (Ray's
`preload_python_modules`): registers the benchmark's `threshold` model there, so the
inference actors can build it. (A runtime_env setup hook would do the same but start every
worker through Ray's runtime-environment path, which the measurement would then include.)"""

from .threshold_model import register

register()
