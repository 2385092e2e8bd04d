"""The one error the study reports as bad input (exit status 2, one line)."""


class StudyInputError(Exception):
    """Bad command-line input: the message says what was given and what to pass instead."""
