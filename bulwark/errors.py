"""One error type for bad user input: the CLI prints its message on one line and exits with code 2."""


class BulwarkInputError(Exception):
    """Bad input from the user (file, key, value). The message names where and what to do."""
