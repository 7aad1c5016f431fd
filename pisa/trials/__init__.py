"""The Tune trial runtime: one training inside a trial, seeds side by side, recovery marks,
the callbacks that give each trial an MLflow run, and how many trainings fit at once."""
