"""Deployment files and their checks; not one of testbench's layered packages."""
