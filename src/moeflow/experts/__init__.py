"""Where expert weights live and run."""
