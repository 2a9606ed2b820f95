"""Build and run generated projects on each kind of target."""
