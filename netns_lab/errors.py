"""Exceptions the lab raises for problems a user can fix (the CLI prints them as one line)."""


class LabError(Exception):
    """Something about the lab is wrong: it exists already, a command failed, ..."""


class LabConfigError(LabError, ValueError):
    """A parameter is out of range or malformed (the CLI exits with 2, like argparse)."""
