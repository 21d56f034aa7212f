"""Generation: sampling engines, rollouts, data, rewards, the batch contract and the generation
worker. Runs in the trainer, the overlap sampler and workers; never imports the trainer."""
