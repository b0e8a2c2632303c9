"""Sweeps: one ec2_training run per hyperparameter set, under one parent MLflow run, gated on the best set."""
