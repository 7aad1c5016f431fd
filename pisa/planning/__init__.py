"""What trainings will cost before they start: the workload, the cluster it is priced on, a
training rate, `pack: auto`'s layouts and the cost plan; knows nothing of searches."""
