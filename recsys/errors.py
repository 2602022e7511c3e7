"""Errors about input data: their messages name the file, line and column that were wrong."""


class InputDataError(ValueError):
    """Input that a step refuses; nothing is written when it is raised."""
