"""slimlm."""
