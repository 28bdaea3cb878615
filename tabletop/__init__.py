"""Tabletop exercises: scenarios replayed against staging with the real runbooks, timed, scored and reported."""
