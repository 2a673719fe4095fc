"""Long-lived Ray actors of the measuring loop. Logic in plain classes; ray.remote in remote.py."""
