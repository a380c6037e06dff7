"""User-facing error type for chameleon_ext.

Every problem caused by the user's input (a missing data folder, an empty domain, a file that
is not UTF-8, a vocabulary mismatch, an invalid option value, ...) is raised as
:class:`ChameleonUserError` with a message that names the offending domain, file or option
and says what was expected. Internal bugs keep raising ordinary exceptions, so a command-line
front end can print ``ChameleonUserError`` messages without a traceback and let everything
else surface as a crash.
"""

from __future__ import annotations

__all__ = ["ChameleonUserError"]


class ChameleonUserError(ValueError):
    """Invalid user input: a bad path, data file, option value or domain weight.

    Subclasses :class:`ValueError` so generic callers that already catch ``ValueError`` keep
    working.
    """
