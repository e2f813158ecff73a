"""Training: setup (process groups, model, optimizer), the step and its loss, checkpoints, logging, the loop."""
