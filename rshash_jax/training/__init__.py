"""Both trainers, the shared loop, train state and checkpoints, evaluation and config checks."""
