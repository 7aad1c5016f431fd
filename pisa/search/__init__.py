"""A search: the study file, the Tuner, its trainable, state, console, MLflow runs, results,
reports, fidelity and the validation of its winner; imports every layer but cli."""
