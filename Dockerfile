# The image of every service in docker-compose.yaml: Airflow's components, the Celery workers, the init job and the
# MLflow server. Built, never run here (no Docker engine on the development machines): see docs/production.md, "Production
# deployment".
FROM apache/airflow:3.3.2-python3.11

# What the Airflow side imports (the DAGs and the orchestrator; the training job's torch runs on the instance), at
# the versions of requirements.lock (the tested set), plus the deployment's set (Celery, PostgreSQL drivers, Redis).
COPY --chown=airflow:root requirements.lock requirements-deploy.lock /opt/ec2-trainer/
RUN pip install --no-cache-dir \
      -c /opt/ec2-trainer/requirements.lock -r /opt/ec2-trainer/requirements-deploy.lock \
      apache-airflow apache-airflow-providers-amazon mlflow paramiko requests boto3 \
 && pip check

# The code finds config/ and userdata/ next to dags/ (the DAGs folder of the image's AIRFLOW_HOME).
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root config/ /opt/airflow/config/
COPY --chown=airflow:root userdata/ /opt/airflow/userdata/
# The triggerer imports the CI gate's trigger by its class path, as the harness does (embedded/deploy/airflow_local.py).
ENV PYTHONPATH=/opt/airflow/dags
