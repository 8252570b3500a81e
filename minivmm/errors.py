"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class MinivmmError(Exception):
    """Bad input: an unknown name, a malformed file or value. Never a crash of ours."""


class NotCarried(MinivmmError):
    """What a snapshot or a migration cannot carry (the line names it): the VM goes on
    where it is."""
