"""The Kueue controller for the Kueue tests: its Go module and build script, and controller.py, which runs it."""
