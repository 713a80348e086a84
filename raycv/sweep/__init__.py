"""``raycv tune``: Ray Tune sweeps whose trials are Ray Train runs of the shared loop."""
