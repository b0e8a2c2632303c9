"""MLflow: a training's run (runs.py), the champion gate (promotion.py), ec2_training's runs as the DAGs that start
them see them (training_runs.py), and the one loop reading MLflow's paged searches to the end (pages.py)."""
