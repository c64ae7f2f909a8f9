"""Asset group `golden`: the versioned golden sets."""
