"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class MinivmmError(Exception):
    """Bad input: an unknown name, a malformed file or value. Never a crash of ours."""
