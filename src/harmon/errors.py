"""The project's error for what a user can fix.

:class:`InputError` means: a value that entered harmon (an argument, a setting, a file, a model folder, a
request) cannot be used, and the message says which and why. The command line prints it as one
``harmon: error: ...`` line with exit code 2; the server answers it with a 400. Any other exception is a
bug or an outside failure and keeps its traceback. It subclasses ``ValueError`` so that code catching
``ValueError`` keeps working.
"""
from __future__ import annotations


class InputError(ValueError):
    """A value given to harmon cannot be used; the message names it and says why."""
