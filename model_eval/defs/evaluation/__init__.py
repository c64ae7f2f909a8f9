"""Asset group `evaluation`: each model's answers (one partition per model) and their scores."""
