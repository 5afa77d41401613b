"""One error type for bad user input: the CLI prints its message on one line and exits with code 2."""


class BulwarkInputError(Exception):
    """Bad input from the user (file, key, value). The message names where and what to do."""


ERROR_FILE_ENV = "BULWARK_ERROR_FILE"


def report(line: str, speak: bool = True) -> None:
    """Say a rank's one-line error once for the whole run.

    Under the launcher (bulwark/launch.py) the ranks append to the file BULWARK_ERROR_FILE names and the
    launcher prints the first line once torchrun is done: the rank that failed first wrote it, before
    torchrun stopped the others (whose "interrupted" lines come later and are not shown). Elsewhere (a
    SLURM job's ranks) the line goes to stderr when `speak`.
    """
    import os
    import sys

    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode())
        finally:
            os.close(fd)
    elif speak:
        print(line, file=sys.stderr, flush=True)
