"""The weekly schedule and the sensors."""
