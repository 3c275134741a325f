"""The project's error types, in a leaf module every layer can import (no import circles).

A ConfigError is bad input found before any weight loads: run.py prints its message as one
`error:` line and exits 2.
"""


class ConfigError(ValueError):
    pass
