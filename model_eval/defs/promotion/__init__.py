"""Asset group `promotion`: production calls and each task's assigned model."""
