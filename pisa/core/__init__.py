"""Bottom layer: PISA maths, sampling, configs, schedules, errors, stats, progress, storage, URIs; imports no layer."""
