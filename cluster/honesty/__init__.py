"""Honesty checks (DESIGN §5): signed receipts of streaming jobs, peer authentication.

Domain code only (no Ray): the Serve apps and actors wire these classes in.
"""
