"""Airflow adapters for recap_tasks: stage callables, runners. Imports nothing heavy at import time."""
