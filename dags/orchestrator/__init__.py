"""Logic of the ephemeral-EC2 training orchestrator; the DAG files under dags/ only wire it."""
