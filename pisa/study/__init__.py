"""A search: study file, Tuner, trials, their MLflow runs, state, results, reports; imports every layer but cli."""


def __getattr__(name: str):
    """The names of the earlier single `pisa.study` module, for the Tune state it pickled."""
    from .._moved import study_attribute

    return study_attribute(name)
