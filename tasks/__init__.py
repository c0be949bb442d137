"""Execution of routines: the run state machine (Tier 2), step execution (Tier 3) and the Celery tasks."""
