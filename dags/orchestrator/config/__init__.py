"""Configuration: the deployment's settings (settings.py), a run's Params (run_params.py), Airflow connections
(connections.py) and a run's resolved configuration (resolve.py)."""
