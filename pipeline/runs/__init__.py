"""Run mechanics: run directories and checkpoints, output guards, resume, run logs and progress, file
rules and locks, torchrun start-up, the allocator, what every training loop shares. Knows no model."""
