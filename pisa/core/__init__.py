"""Bottom layer: PISA maths, sampling, configs, schedules, errors, stats, progress, storage, URIs, the checkpoint
format, the epoch report; imports no layer."""
