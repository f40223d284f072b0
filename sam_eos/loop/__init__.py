"""The training loop: SAM (or GD) steps with Hessian checks, data feeding, devices,
checkpoints and progress."""
