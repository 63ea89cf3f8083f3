"""ringplan_runtime: exact ring and ring-dilated attention on torch.distributed, and measurement."""
