"""Training: the losses of paper §4.2 (Eq. 2-5), optimiser, train step and loop."""
