"""The one exception type for bad input: its message is a single line naming the problem and the fix.

The CLI prints it as `magicfusion: error: <message>` and exits with status 2; the Python API raises it.
"""


class InputError(ValueError):
    """Bad user input (a file, an option, a model): the message says what is wrong and how to fix it."""
