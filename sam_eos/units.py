"""Time units of the harness: it counts seconds; flags, raw data and plots speak hours."""

SECONDS_PER_HOUR = 3600.0
