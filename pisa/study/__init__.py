"""A search: study file, Tuner, trials, their MLflow runs, state, results, reports; imports every layer but cli."""
