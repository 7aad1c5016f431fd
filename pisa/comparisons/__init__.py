"""Retraining over seeds: a grid of trainings as one Tune run, `pisa compare`, `pisa paper`,
`pisa reproduce` and the statistics table they print; knows nothing of searches."""
