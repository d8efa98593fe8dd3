"""The one exception type layercut raises for bad input: its message names the problem and the fix."""


class LayercutError(Exception):
    """Bad input or an unsupported model; the message says what is wrong and how to fix it.

    The command line prints the message and exits with status 2.
    """
