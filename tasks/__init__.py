"""Execution of routines, free of Celery: the routine language and its plans, the run engine that
submits runs, runs step messages, commits steps and moves runs along (see `tasks.engine`)."""
