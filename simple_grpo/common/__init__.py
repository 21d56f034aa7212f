"""What the trainer and the generation side both need: the run's config, LoRA, dropout."""
