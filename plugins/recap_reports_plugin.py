"""Airflow plugin: quality reports of recap runs inside the Airflow UI (see recap_airflow/ui.py)."""

from airflow.plugins_manager import AirflowPlugin

from recap_airflow.ui import plugin_spec


class RecapReportsPlugin(AirflowPlugin):
    name = "recap_reports"
    fastapi_apps = plugin_spec()["fastapi_apps"]
    external_views = plugin_spec()["external_views"]
