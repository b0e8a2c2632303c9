"""The deployment harness: every service started together (stack), a real Airflow on this machine (airflow_local),
the production replica (production: PostgreSQL, Redis, Celery), the live local deployment and the load batches."""
